"""The main job runs end to end on SmolLM2 and finds Paris."""

from __future__ import annotations

from glassbox import demo


def test_demo_runs_and_reports_real_semantics(capsys):
    numbers = demo.main()
    printed = capsys.readouterr().out
    assert numbers["top1"] == " Paris"
    assert numbers["patched_paris"] > 0.1
    assert numbers["remote_identical"]  # section 7: an embedded server gives the same values
    assert numbers["cotenant_max_diff"] <= 1e-4  # queued traces shared passes, values as alone
    for heading in ("Activation analysis", "Logit lens", "Activation patching", "Gradients", "Generation"):
        assert heading in printed
