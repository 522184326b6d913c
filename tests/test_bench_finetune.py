"""The fine-tuning benchmark's own pieces: cross-validation folds and the mail corpus's text."""

from __future__ import annotations

import sys
from collections import Counter
from email.message import EmailMessage
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_finetune  # noqa: E402
import mail_corpus  # noqa: E402

from scratchlm.config import ClassifyConfig, load_config  # noqa: E402
from scratchlm.finetune.classify import labelled_splits  # noqa: E402


def test_cv_folds_deal_out_train_and_val_once_each_and_never_test(shared_data: Path) -> None:
    sms = shared_data / "sms_spam" / "SMSSpamCollection"
    splits = labelled_splits(load_config(ClassifyConfig, None, [f"--classify.data={sms}",
                                                                *bench_finetune.SMS]).classify)
    folds = bench_finetune.cv_folds(5)
    assert len(folds) == 5
    pool = Counter(splits["train"] + splits["val"])
    assert sum((Counter(held) for _, held in folds), Counter()) == pool  # each held out once
    for train, held in folds:
        assert Counter(train) + Counter(held) == pool  # the rest trains
    sizes = [len(held) for _, held in folds]
    assert max(sizes) - min(sizes) <= 1
    for label in ("ham", "spam"):  # every fold has the pool's mix of labels
        counts = [sum(y == label for _, y in held) for _, held in folds]
        assert max(counts) - min(counts) <= 1, counts
    # The same folds on every call, another order with another seed.
    assert bench_finetune.cv_folds(5) == folds
    assert bench_finetune.cv_folds(5, seed=1)[0][1] != folds[0][1]


def mail(parts: list[tuple[str, str]]) -> str:
    msg = EmailMessage()
    msg["From"], msg["Subject"] = "a@example.com", "hello"
    for i, (subtype, body) in enumerate(parts):
        if i == 0:
            msg.set_content(body, subtype=subtype)
        else:
            msg.add_alternative(body, subtype=subtype)
    return msg.as_string()


def test_mail_text_keeps_the_plain_part_or_the_text_of_the_html_part() -> None:
    both = mail([("plain", "Meet at   noon.\n\n\n\nBring the report."),
                 ("html", "<p>Meet at <b>noon</b></p>")])
    assert mail_corpus.message_text(both) == "Meet at noon.\n\nBring the report."
    html = mail([("html", "<html><style>p {color: red}</style><p>WIN a <b>FREE</b> prize"
                          "<script>track()</script></p><div>Call now</div></html>")])
    text = mail_corpus.message_text(html)
    assert text == "WIN a FREE prize\nCall now"  # no headers, styles or scripts
    assert "From:" not in text and "Subject" not in text
    assert mail_corpus.message_text(mail([("plain", "  \n ")])) is None
