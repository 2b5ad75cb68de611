"""docs/writing-mechanisms.md is code plugin authors copy: its example mechanism and its tests run as written."""
import re
import sys
import types
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-mechanisms.md"


def test_the_guides_example_mechanism_passes_the_guides_tests(monkeypatch, tmp_path):
    from tuneforge.sdk.testing import train_tiny

    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    (mechanism,) = [b for b in blocks if "class OutGain" in b]
    (tests,) = [b for b in blocks if "def test_only_the_gain_trains" in b]
    package = types.ModuleType("my_package")  # the guide's tests import it from "my_package"
    exec(compile(mechanism, str(GUIDE), "exec"), package.__dict__)
    monkeypatch.setitem(sys.modules, "my_package", package)
    namespace = {}
    exec(compile(tests, str(GUIDE), "exec"), namespace)
    namespace["test_hooks_match_the_contract"]()
    namespace["test_only_the_gain_trains"](lambda *m, **kw: train_tiny(*m, out=tmp_path / "run", **kw))
