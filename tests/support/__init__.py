"""Test support: builders that several test modules (and bench/) share.

`esp_build` seals ESP packets independently of the decoder, `synthetic` makes the records and
events of one or two hosts, `bundles` writes them as bundles and pcaps. Nothing here is a test.
"""
