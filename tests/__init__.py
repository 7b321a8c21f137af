"""
txcluster's tests: fast unit tests (fakes and task.Clock) beside
integration tests that spawn real workers and send real traffic on
loopback (test_integration*, test_cli).
"""
