from ipsec_capture.cli import main

raise SystemExit(main())
