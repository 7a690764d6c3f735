"""Helpers of the test suite: round drivers, input drawers, process launchers, the GPU compile check."""
