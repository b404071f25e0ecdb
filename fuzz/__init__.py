"""Fuzzing the sidecar's parsers with atheris (libFuzzer): ``python -m fuzz TARGET --seconds N``.

``targets.py`` holds the targets as plain functions of bytes that raise on a broken property (no
atheris needed to replay an input: tests/unit/test_fuzz_cases.py does, for every seed and every
saved crash); ``spiffe_reference.py`` is the independent SPIFFE ID grammar the validator is held
against; ``seeds/<target>/`` are the inputs each run starts from. Crashes land in ``crashes/``.
"""
