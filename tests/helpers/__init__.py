"""What several test files share (importable as ``helpers`` through ``pythonpath`` in pyproject.toml): the tiny
training recipe, the ``glip-pl`` process runners and the one CLI pre-training that the slow tests start from."""
