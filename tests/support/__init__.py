"""What the tests share, and no tests: the real peers (DCMTK, GDCM, Orthanc behind
nginx), the gateway as a child process, the doubles of the clouds' token endpoints and
archives, and the loops of the crash, chaos and power-cut runs.  The test modules in
tests/ and the benchmarks in tests/bench/ import them; they import nothing from the
test modules.
"""
