"""The `tuneforge` console script and the demo."""

import libs  # noqa: F401  (process environment first: see libs/__init__.py)
