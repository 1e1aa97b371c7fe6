"""The quickstart example runs end to end and its edits do what task arithmetic promises."""

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_example(capsys):
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--steps", "150"])
    # Adding a task's vector must reduce that task's error relative to the pretrained model.
    assert results["+ τ_sin"]["sin"] < results["pretrained"]["sin"]
    assert results["+ τ_cos"]["cos"] < results["pretrained"]["cos"]
    assert "MSE sin" in capsys.readouterr().out
