"""The installed distribution's version, read from package metadata."""

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("ds4-agent")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
