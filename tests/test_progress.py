"""Progress inside a stage: the loop over layers says which one it is on and the time left,
a long call says what it is doing; nothing outside a shown stage."""

from __future__ import annotations

import re
import time

from compresscnn.util import progress


def test_track_outside_a_stage_is_silent(capsys):
    assert list(progress.track(range(3), "layer", label=str)) == [0, 1, 2]
    progress.doing("nothing to say")
    assert capsys.readouterr().err == ""


def test_track_says_which_layer_and_the_time_left(monkeypatch, capsys):
    monkeypatch.setattr(progress, "INTERVAL", 0.05)
    names = ["conv1", "layer1.0.conv1", "fc"]
    with progress.timed(None, "plan"):
        got = []
        for name in progress.track(names, "layer", label=lambda n: f"{n}, tucker2",
                                   weight=lambda n: 2.0 if n == "fc" else 1.0):
            time.sleep(0.15)
            got.append(name)
    assert got == names
    err = capsys.readouterr().err.splitlines()
    lines = [ln for ln in err if ln.startswith("[plan] layer ")]
    assert lines, err
    for ln in lines:
        assert re.fullmatch(r"\[plan\] layer [123]/3 \((conv1|layer1\.0\.conv1|fc), tucker2\), "
                            r"[\d.]+ s(, about [\d.]+ s left)?", ln), ln
    assert any("about" in ln for ln in lines)  # once a layer is done, the time left
    assert not any(ln.startswith("[plan] layer 1/3") and "about" in ln for ln in lines)
    assert "still running" not in "\n".join(err)
    # the weights spread the estimate: at layer 3 (weight 2 of 4) about twice the time spent
    last = [ln for ln in lines if ln.startswith("[plan] layer 3/3")]
    if last:
        spent, left = map(float, re.search(r", ([\d.]+) s, about ([\d.]+) s left",
                                           last[-1]).groups())
        assert left > 0.5 * spent


def test_track_time_left_is_not_thrown_by_a_few_heavy_items(monkeypatch, capsys):
    """Weights that put nearly everything on the last item (a wide classifier) still give a
    bounded estimate after the first items: half of it is spread evenly."""
    monkeypatch.setattr(progress, "INTERVAL", 0.02)
    items = list(range(8))
    with progress.timed(None, "plan"):
        for i in progress.track(items, "layer", weight=lambda i: 1e6 if i == 7 else 1.0):
            time.sleep(0.05)
    lines = [ln for ln in capsys.readouterr().err.splitlines()
             if re.match(r"\[plan\] layer [3-7]/8, ", ln) and "about" in ln]
    assert lines
    for ln in lines:
        spent, left = map(float, re.search(r", ([\d.]+) s, about ([\d.]+) s left", ln).groups())
        assert left < 12 * spent, ln  # by the weights alone: about 500,000 x


def test_doing_replaces_still_running(monkeypatch, capsys):
    monkeypatch.setattr(progress, "INTERVAL", 0.05)
    with progress.timed(None, "export_onnx"):
        progress.doing("writing the file")
        time.sleep(0.2)
    err = capsys.readouterr().err.splitlines()
    assert any(re.fullmatch(r"\[export_onnx\] writing the file, [\d.]+ s", ln) for ln in err)
    assert not any("still running" in ln for ln in err)
    with progress.timed(None, "export_onnx", quiet=True):
        progress.doing("writing the file")
        for _ in progress.track([1, 2], "layer"):
            time.sleep(0.1)
    assert capsys.readouterr().err == ""


def test_a_line_bar_in_a_stage_is_its_status(monkeypatch, capsys):
    """A bar in a log inside a shown stage: the heartbeat prints the bar's line, never
    "still running" between the bar's own lines; after the bar, the stage's own status."""
    monkeypatch.setattr(progress, "INTERVAL", 0.05)
    with progress.timed(None, "finetune"):
        b = progress.LineBar(30, "finetune", unit="steps")
        for _ in range(30):
            time.sleep(0.01)
            b.update()
        b.close()
        assert "finetune" not in progress._STATUS
    err = capsys.readouterr().err.splitlines()
    assert not any("still running" in ln for ln in err), err
    assert any(re.match(r"\[finetune\] \d+/30 steps", ln) for ln in err), err
