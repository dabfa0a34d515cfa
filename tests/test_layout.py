"""train_gpt.py stays one readable file: at most 2,000 lines, its sections in data-flow order, nothing imported
from the rest of the repo."""
import ast
import re

from conftest import ROOT

SECTIONS = ["config", "data", "model", "optimizer", "schedule", "training", "quantization/export", "evaluation", "main"]


def test_train_gpt_is_one_file_of_sections_in_data_flow_order():
    src = (ROOT / "train_gpt.py").read_text()
    lines = src.splitlines()
    assert len(lines) <= 2000, f"train_gpt.py has {len(lines)} lines: measurement-only code belongs in tools/"
    assert [line.split()[-1] for line in lines if re.fullmatch(r"# -{20,} \S+", line)] == SECTIONS
    local = {p.stem for folder in ("tools", "data", "eval", "tests") for p in (ROOT / folder).glob("*.py")}
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(src)) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(src))
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & local
