"""The README's quickstart runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README lost its quickstart"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(README), "exec"), {})
    assert "TaskVector(2 tensors, 18 entries" in capsys.readouterr().out
    assert (tmp_path / "tv.safetensors").exists()


def test_the_api_page_example_registers_a_working_method(tmp_path):
    import torch

    import taskarith as ta

    page = README.parent / "docs" / "api.md"
    block = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)[0]
    exec(compile(block, str(page), "exec"), {})
    try:
        a = ta.TaskVector({"w": torch.tensor([1.0, -2.0])})
        b = ta.TaskVector({"w": torch.tensor([3.0, 1.0])})
        assert ta.merge([a, b], "sign_vote")["w"].tolist() == [2.0, -1.5]
        a.save(tmp_path / "a.safetensors"), b.save(tmp_path / "b.safetensors")
        out = ta.merge_files(None, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "m.safetensors",
                             "sign_vote", max_memory=16)
        assert ta.load(out)["w"].tolist() == [2.0, -1.5]
    finally:
        ta.merging.unregister("sign_vote")
