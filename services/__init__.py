"""The three services: dataprep, trainer, serving."""

import libs  # noqa: F401  (process environment first: see libs/__init__.py)
