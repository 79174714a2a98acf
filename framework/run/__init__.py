"""The run machinery: typed run specs and their validation (``spec``), launching ranks with
Lightning Fabric (``launch``), the TP inference runner (``runner``), rank failures and fault
injection (``faults``) and the timing loop shared by the benchmark and the calibration
(``measure``). Import the module you need; this package imports nothing on its own.
"""
