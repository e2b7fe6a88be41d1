"""The main job runs end to end on SmolLM2, finds Paris, and writes its figures as PNGs."""

from __future__ import annotations

from pathlib import Path

from glassbox import demo


def test_demo_runs_and_reports_real_semantics(capsys, tmp_path):
    folder = tmp_path / "figures"
    numbers = demo.main(figures=folder)
    printed = capsys.readouterr().out
    assert numbers["top1"] == " Paris"
    assert numbers["patched_paris"] > 0.1
    assert numbers["remote_identical"]  # section 7: an embedded server gives the same values
    assert numbers["cotenant_max_diff"] <= 1e-4  # queued traces shared passes, values as alone
    for heading in ("Activation analysis", "Logit lens", "Activation patching", "Gradients", "Generation",
                    "An activation dataset"):
        assert heading in printed
    # section 7: every token of the 32 documents became a row, in shards on disk
    from glassbox import ActivationDataset

    assert numbers["extracted_rows"] == len(ActivationDataset(numbers["extracted_dir"])) > 32 * 5
    # sections 1-3 drew their values: each PNG is written, non-empty, and its path printed
    written = [Path(p) for p in numbers["figures"]]
    assert sorted(p.name for p in written) == ["attention_layer3.png", "logit_lens.png", "norms.png",
                                               "patching.png"]
    for path in written:
        assert path.parent == folder
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        assert f"figure: {path}" in printed
