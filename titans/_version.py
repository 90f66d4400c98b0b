"""The package version, in one place: pyproject.toml reads it (tool.setuptools.dynamic), `titans
--version` and `titans.__version__` print it. CHANGELOG.md has what each version changed."""

__version__ = "0.1.0"
