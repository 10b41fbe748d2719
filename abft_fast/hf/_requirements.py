"""Why ``abft_fast.hf`` could not import transformers' attention interfaces, in one message."""
from __future__ import annotations

import importlib.metadata

MIN_TRANSFORMERS = "4.53"


def import_failure(err: ImportError) -> ImportError:
    """An ImportError that names the real cause of ``err``: a missing or too old transformers, or
    (with a recent enough transformers installed) the import error itself and the module it came
    from, so that a broken or shadowed dependency is not reported as an old transformers."""
    need = MIN_TRANSFORMERS
    try:
        have = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return ImportError(f"abft_fast.hf needs transformers >= {need}, which is not installed: "
                           f"`pip install 'transformers>={need}'` ({err})")
    from packaging.version import Version  # a dependency of transformers, which is installed
    if Version(have) < Version(need):
        return ImportError(f"abft_fast.hf needs transformers >= {need} (AttentionMaskInterface); "
                           f"transformers {have} is installed. Upgrade with "
                           f"`pip install 'transformers>={need}'` ({err})")
    where = ""
    name = getattr(err, "name", None)
    path = getattr(err, "path", None)
    if name or path:
        where = f" (module {name!r}" + (f" from {path}" if path else "") + ")"
    return ImportError(f"abft_fast.hf: transformers {have} is installed but importing its attention "
                       f"interfaces failed{where}: {type(err).__name__}: {err}. This is not a version "
                       "problem; a module on sys.path that shadows one of transformers' dependencies "
                       "(a local directory of the same name as an installed package) is a common cause.")
