"""Options shared by the test modules."""


def pytest_addoption(parser):
    parser.addoption("--fuzz-cases", type=int, default=200,
                     help="cases of tests/test_fuzz.py's shard-set fuzzing (default 200; the "
                     "campaign figures use 10000)")
    parser.addoption("--fuzz-seed", type=int, default=1, help="seed of the fuzzing cases")
