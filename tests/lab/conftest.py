"""Lab tests run inside the session's one kernel lab VM (tests/vm/fixtures.py)."""

from tests.vm.fixtures import lab_vm  # noqa: F401 (a fixture)
