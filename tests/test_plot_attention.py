import importlib.util

from conftest import REPO


def load_script():
    spec = importlib.util.spec_from_file_location("plot_attention", REPO / "scripts" / "plot_attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_attention_writes_a_png(tiny_bert_dir, tmp_path):
    output = tmp_path / "maps" / "attention.png"
    args = ["--model", str(tiny_bert_dir), "--text", "the cat ran", "--layers", "0", "-1", "--heads", "1"]
    written = load_script().main([*args, "--r", "0.4", "--output", str(output)])
    assert written == output
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and output.stat().st_size > 10_000
