"""The one exception type lmforge raises for bad input at its boundaries."""


class LmforgeError(Exception):
    """A user-facing error: bad file, config, request or data. The message says what and where."""


def missing_extra(feature: str, package: str, extra: str) -> LmforgeError:
    """The error for an optional feature whose package the default install leaves out, naming the extra."""
    return LmforgeError(f"{feature} needs the {package} package, which is optional: pip install 'lmforge[{extra}]'")
