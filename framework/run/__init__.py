"""The run machinery: typed run specs and their validation (``spec``), launching ranks with
Lightning Fabric (``launch``), the TP inference runner (``runner``), rank failures and fault
injection (``faults``), the timing loop shared by the benchmark and the calibration
(``measure``) and the exact integer inputs that checks rebuild on every rank (``inputs``).
Import the module you need; this package imports nothing on its own.
"""
