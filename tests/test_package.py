"""The package's lazy top-level API."""

import subprocess
import sys


def test_top_level_names_resolve_in_a_fresh_process():
    # a fresh interpreter: nothing of compress imported yet (the lazy lookup once recursed forever)
    code = "import compress; print(compress.load.__name__, compress.run.__name__, compress.Recipe.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["load", "run", "Recipe"]


def test_unknown_attribute_is_an_attribute_error():
    import compress

    try:
        compress.no_such_thing
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")
