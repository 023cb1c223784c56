"""Retrieval and zero-shot metrics, class embeddings, templates, queries and plots against independent computations."""

from __future__ import annotations

import random
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from torch import nn

from cliptrace.data.record import Record
from cliptrace.evaluate import (
    IMAGENET_TEMPLATES,
    SIMPLE_TEMPLATES,
    class_embeddings,
    embed_images,
    embed_texts,
    evaluate,
    format_metrics_table,
    image_query,
    load_classnames,
    load_templates,
    plot_image_query,
    plot_text_query,
    retrieval_metrics,
    text_query,
    zero_shot_classify,
    zero_shot_metrics,
)
from cliptrace.models.base import DualEncoder

# ---------------------------------------------------------------- brute-force references


def pessimistic_rank(scores: list[float], correct: list[bool]) -> int:
    """1-based position of the first correct candidate after sorting best first, wrong before correct on ties."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], correct[j]))
    return next(position for position, j in enumerate(order) if correct[j]) + 1


def summary(ranks: list[int], ks: tuple[int, ...], prefix: str) -> dict[str, float]:
    out = {f"{prefix}R@{k}": 100.0 * sum(rank <= k for rank in ranks) / len(ranks) for k in ks}
    out[f"{prefix}mean_rank"] = sum(ranks) / len(ranks)
    out[f"{prefix}median_rank"] = float(statistics.median(ranks))
    return out


def brute_force_retrieval(
    images: torch.Tensor, texts: torch.Tensor, text_to_image: list[int], ks: tuple[int, ...]
) -> dict[str, float]:
    """Every similarity as a separate dot product, every rank by sorting a full row in plain Python."""
    n, m = images.shape[0], texts.shape[0]
    sims = [[float(torch.dot(images[i], texts[t])) for t in range(m)] for i in range(n)]
    i2t = [pessimistic_rank(sims[i], [text_to_image[t] == i for t in range(m)]) for i in range(n)]
    t2i = [
        pessimistic_rank([sims[i][t] for i in range(n)], [i == text_to_image[t] for i in range(n)]) for t in range(m)
    ]
    metrics = {**summary(i2t, ks, "i2t_"), **summary(t2i, ks, "t2i_")}
    metrics["rsum"] = sum(metrics[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks)
    return metrics


def random_case(seed: int, integer: bool) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """N images with 1-5 captions each; integer features in {-1, 0, 1} make exact ties common."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    n, dim = rng.randint(1, 9), rng.choice([2, 3, 8])
    text_to_image = [i for i in range(n) for _ in range(rng.randint(1, 5))]
    rng.shuffle(text_to_image)
    shape_i, shape_t = (n, dim), (len(text_to_image), dim)
    if integer:
        images = torch.randint(-1, 2, shape_i, generator=generator).double()
        texts = torch.randint(-1, 2, shape_t, generator=generator).double()
    else:
        images = F.normalize(torch.randn(shape_i, generator=generator, dtype=torch.float64), dim=-1)
        texts = F.normalize(torch.randn(shape_t, generator=generator, dtype=torch.float64), dim=-1)
    return images, texts, text_to_image


# ---------------------------------------------------------------- retrieval


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("integer", [True, False], ids=["ties", "continuous"])
@pytest.mark.parametrize("block_size", [1, 3, 1024])
def test_retrieval_equals_brute_force(seed: int, integer: bool, block_size: int) -> None:
    images, texts, text_to_image = random_case(seed, integer)
    ks = (1, 2, 5, 10)
    metrics = retrieval_metrics(images, texts, torch.tensor(text_to_image), ks, block_size=block_size)
    expected = brute_force_retrieval(images, texts, text_to_image, ks)
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key


def test_retrieval_perfect_features() -> None:
    images = torch.eye(6)
    text_to_image = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5])
    metrics = retrieval_metrics(images, images[text_to_image], text_to_image)
    for direction in ("i2t", "t2i"):
        assert metrics[f"{direction}_R@1"] == 100.0
        assert metrics[f"{direction}_mean_rank"] == 1.0
        assert metrics[f"{direction}_median_rank"] == 1.0
    assert metrics["rsum"] == 600.0


def test_retrieval_ties_are_pessimistic() -> None:
    # All similarities equal: each image ranks its 2 captions behind the 2·(N-1) others, each caption its image last.
    n, per_image = 4, 2
    text_to_image = torch.arange(n).repeat_interleave(per_image)
    metrics = retrieval_metrics(torch.ones(n, 3), torch.ones(n * per_image, 3), text_to_image, ks=(1,))
    assert metrics["i2t_mean_rank"] == 1 + per_image * (n - 1)
    assert metrics["t2i_mean_rank"] == n
    assert metrics["i2t_R@1"] == metrics["t2i_R@1"] == 0.0


@pytest.mark.parametrize(
    "images, texts, text_to_image, message",
    [
        (torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]), "same embedding dimension"),
        (torch.zeros(2, 3), torch.zeros(3, 3), torch.tensor([0, 1]), r"shape \(3,\)"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 2]), r"text_to_image\[1\] = 2"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, -1]), r"text_to_image\[1\] = -1"),
        (torch.zeros(3, 3), torch.zeros(2, 3), torch.tensor([0, 2]), "image 1 has no caption"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.0, 1.0]), "integer indices"),
        (torch.zeros(0, 3), torch.zeros(2, 3), torch.tensor([0, 0]), "image_features must have shape"),
        (torch.zeros(2, 3), torch.tensor([[0.0] * 3, [float("nan")] * 3]), torch.tensor([0, 1]), "text_features row 1"),
    ],
)
def test_retrieval_rejects_bad_input(images, texts, text_to_image, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(images, texts, text_to_image)


def test_retrieval_rejects_bad_ks() -> None:
    with pytest.raises(ValueError, match="ks must be positive"):
        retrieval_metrics(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), ks=(0, 1))


# ---------------------------------------------------------------- zero-shot metrics


@pytest.mark.parametrize("seed", range(8))
def test_zero_shot_metrics_equal_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    n, n_classes, dim = rng.randint(1, 30), rng.randint(2, 9), rng.choice([2, 4])
    images = torch.randint(-1, 2, (n, dim), generator=generator).double()
    classes = torch.randint(-1, 2, (n_classes, dim), generator=generator).double()
    labels = [rng.randrange(n_classes) for _ in range(n)]
    names = [f"class {c}" for c in range(n_classes)]
    metrics = zero_shot_metrics(images, classes, torch.tensor(labels), ks=(1, 3, 5), classnames=names)

    ranks = []
    for i in range(n):
        scores = [float(torch.dot(images[i], classes[c])) for c in range(n_classes)]
        ranks.append(pessimistic_rank(scores, [c == labels[i] for c in range(n_classes)]))
    for k in (1, 3, 5):
        assert metrics[f"top{k}"] == pytest.approx(100.0 * sum(r <= k for r in ranks) / n)
    recall = {}
    for c in range(n_classes):
        members = [i for i in range(n) if labels[i] == c]
        if members:
            recall[names[c]] = 100.0 * sum(ranks[i] == 1 for i in members) / len(members)
    assert metrics["per_class_recall"] == pytest.approx(recall)
    assert metrics["mean_per_class_recall"] == pytest.approx(sum(recall.values()) / len(recall))
    assert metrics["n_images"] == n


def test_zero_shot_metrics_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match=r"labels\[1\] = 3"):
        zero_shot_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="2 class names for 3"):
        zero_shot_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 2]), classnames=["a", "b"])


# ---------------------------------------------------------------- a DualEncoder with known embeddings


def text_vector(text: str) -> list[float]:
    """What FakeEncoder embeds a text to before normalization."""
    return [text.count("r"), text.count("g"), text.count("b"), 1.0]


def image_vector(color: tuple[int, int, int]) -> list[float]:
    """What FakeEncoder embeds a solid-colour image to before normalization."""
    return [color[0] / 255, color[1] / 255, color[2] / 255, 0.5]


class FakeEncoder(DualEncoder):
    """Texts embed as their counts of 'r', 'g', 'b' plus a constant; images as their mean colour plus a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Dropout(0.5)  # would randomize outputs if left in training mode
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.preprocess = lambda image: torch.from_numpy(
            np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        ).permute(2, 0, 1)

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        means = pixel_values.mean(dim=(2, 3))
        features = self.head(torch.cat([means, torch.full_like(means[:, :1], 0.5)], dim=1))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        counts = [((input_ids == ord(letter)) & attention_mask.bool()).sum(1) for letter in "rgb"]
        features = self.head(torch.stack([*counts, torch.ones(input_ids.shape[0])], dim=1).float())
        return F.normalize(features, dim=-1) if normalize else features

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        length = max(len(text) for text in texts)
        ids = torch.zeros(len(texts), length, dtype=torch.long)
        mask = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids[row, : len(text)] = torch.tensor([ord(char) for char in text], dtype=torch.long)
            mask[row, : len(text)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.scale

    def save(self, directory) -> None:
        raise NotImplementedError


class ColorLoader:
    """Loads image references of the form 'R,G,B' as solid-colour 12×10 images."""

    def load(self, ref: str) -> Image.Image:
        return Image.new("RGB", (12, 10), tuple(int(v) for v in ref.split(",")))


def colour_records() -> list[Record]:
    """Records with solid-colour images, 1-3 captions each, labels on some."""
    rng = random.Random(0)
    records = []
    for index in range(11):
        color = tuple(rng.randrange(256) for _ in range(3))
        n_captions = rng.randint(1, 3)
        captions = tuple("".join(rng.choice("rgbx ") for _ in range(rng.randint(1, 9))) for _ in range(n_captions))
        label = ["red", "green", "blue", None][index % 4]
        records.append(Record(f"rec{index}", ",".join(map(str, color)), captions, "test", label))
    return records


def normalized(rows: list[list[float]]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("batch_size", [1, 4, 256])
def test_embeddings_match_the_known_functions_and_keep_modes(batch_size: int) -> None:
    model, records = FakeEncoder(), colour_records()
    model.train()
    model.head.eval()
    images = embed_images(model, records, ColorLoader(), batch_size=batch_size)
    texts = embed_texts(model, ["rr b", "ggg", "xyz"], batch_size=batch_size)
    assert images.dtype == texts.dtype == torch.float32
    expected_images = normalized([image_vector(tuple(map(int, r.image.split(",")))) for r in records])
    torch.testing.assert_close(images.double(), expected_images, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(texts.double(), normalized([text_vector(t) for t in ("rr b", "ggg", "xyz")]))
    assert model.training and not model.head.training


@pytest.mark.parametrize("batch_size", [1, 5, 256])
def test_class_embeddings_are_renormalized_template_means(batch_size: int) -> None:
    classnames = ["red", "green", "blue", "grey"]
    templates = ["a {} thing", "{}", "bright {}!", "rrr {} bbb"]
    features = class_embeddings(FakeEncoder(), classnames, templates, batch_size=batch_size)
    expected = []
    for name in classnames:
        prompts = [normalized([text_vector(t.replace("{}", name))])[0] for t in templates]
        mean = sum(prompts) / len(prompts)
        expected.append((mean / mean.norm()).tolist())
    torch.testing.assert_close(features.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_class_embeddings_reject_template_without_placeholder() -> None:
    with pytest.raises(ValueError, match="template 1"):
        class_embeddings(FakeEncoder(), ["red"], ["a {}", "no placeholder"])


def test_evaluate_equals_metrics_of_hand_computed_features() -> None:
    records = colour_records()
    classnames = ["red", "green", "blue", "black"]
    templates = ["{}", "a {} one"]
    metrics = evaluate(FakeEncoder(), records, ColorLoader(), classnames=classnames, templates=templates, batch_size=3)

    images = normalized([image_vector(tuple(map(int, r.image.split(",")))) for r in records])
    texts = normalized([text_vector(c) for r in records for c in r.captions])
    text_to_image = [i for i, r in enumerate(records) for _ in r.captions]
    expected = brute_force_retrieval(images, texts, text_to_image, (1, 5, 10))
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert (metrics["n_images"], metrics["n_captions"]) == (len(records), len(text_to_image))

    labeled = [i for i, r in enumerate(records) if r.label is not None]
    classes = class_embeddings(FakeEncoder(), classnames, templates).double()
    labels = torch.tensor([classnames.index(records[i].label) for i in labeled])
    zero_shot = zero_shot_metrics(images[labeled], classes, labels, classnames=classnames)
    for key, value in zero_shot.items():
        assert metrics[f"zeroshot_{key}"] == pytest.approx(value), key


def test_evaluate_without_labels_skips_zero_shot() -> None:
    records = [Record(r.id, r.image, r.captions, r.split) for r in colour_records()]
    metrics = evaluate(FakeEncoder(), records, ColorLoader())
    assert "i2t_R@1" in metrics and not any(key.startswith("zeroshot_") for key in metrics)


def test_zero_shot_classify_skips_unlabeled_and_names_unknown_labels() -> None:
    records = colour_records()
    metrics = zero_shot_classify(FakeEncoder(), records, ColorLoader(), ["red", "green", "blue"], ["{}"])
    assert metrics["n_images"] == sum(r.label is not None for r in records)
    with pytest.raises(ValueError, match=r"record 'rec2': label 'blue'"):
        zero_shot_classify(FakeEncoder(), records, ColorLoader(), ["red", "green"], ["{}"])


def test_format_metrics_table_lists_scalars() -> None:
    metrics = {"n_images": 3, "i2t_R@1": 12.3456, "zeroshot_per_class_recall": {"red": 50.0}}
    console = Console(record=True, width=100)
    console.print(format_metrics_table(metrics))
    text = console.export_text()
    assert "i2t_R@1" in text and "12.35" in text and "n_images" in text
    assert "per_class" not in text


# ---------------------------------------------------------------- templates


def test_builtin_templates() -> None:
    assert len(IMAGENET_TEMPLATES) == len(set(IMAGENET_TEMPLATES)) == 80
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert set(SIMPLE_TEMPLATES) <= set(IMAGENET_TEMPLATES)


def test_load_templates(tmp_path) -> None:
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\n\n  une photo d'un {} \nein {}-Bild {{x}}\n", encoding="utf-8")
    assert load_templates(path) == ("a photo of a {}.", "une photo d'un {}", "ein {}-Bild {{x}}")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"a {}\n\nno placeholder\n", r"templates.txt, line 3: .*exactly once"),
        (b"a {} and {}\n", r"line 1: .*exactly once"),
        (b"\n  \n", "no templates found"),
        (b"a {}\nb \xff {}\n", r"line 2: not valid UTF-8"),
    ],
)
def test_load_templates_errors(tmp_path, content: bytes, message: str) -> None:
    path = tmp_path / "templates.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_templates(path)


def test_load_classnames(tmp_path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("red circle\n\nblue square\n赤い 丸\n", encoding="utf-8")
    assert load_classnames(path) == ("red circle", "blue square", "赤い 丸")
    path.write_text("red\nblue\nred\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"classes.txt, line 3: class 'red' repeats line 1"):
        load_classnames(path)


# ---------------------------------------------------------------- queries and plots


@pytest.mark.parametrize("k", [1, 3, 20])
def test_text_query_top_k_equals_argsort(k: int) -> None:
    records = colour_records()
    result = text_query(FakeEncoder(), "rrb", records, ColorLoader(), k=k, true_id="rec4", batch_size=4)
    images = normalized([image_vector(tuple(map(int, r.image.split(",")))) for r in records])
    sims = (images @ normalized([text_vector("rrb")])[0]).numpy()
    order = np.argsort(-sims, kind="stable")
    assert [m.record.id for m in result.matches] == [records[i].id for i in order[:k]]
    assert [m.rank for m in result.matches] == list(range(1, min(k, len(records)) + 1))
    np.testing.assert_allclose([m.similarity for m in result.matches], sims[order[:k]], rtol=1e-5)
    np.testing.assert_allclose(result.similarities.numpy(), sims, rtol=1e-5)
    assert result.true_match.record.id == "rec4"
    assert result.true_match.rank == pessimistic_rank(list(sims), [r.id == "rec4" for r in records])


def test_query_ties_rank_the_true_record_last() -> None:
    records = [Record(f"r{i}", "10,200,30", ("g",)) for i in range(4)]
    result = text_query(FakeEncoder(), "g", records, ColorLoader(), k=2, true_id="r0")
    assert result.true_match.rank == 4
    assert [m.record.id for m in result.matches] == ["r1", "r2"]


def test_image_query_top_k_equals_argsort() -> None:
    records = colour_records()
    image = Image.new("RGB", (9, 9), (250, 20, 40))
    result = image_query(FakeEncoder(), image, records, k=4, true_id="rec7", batch_size=2)
    captions = [(r.id, c) for r in records for c in r.captions]
    sims = (normalized([text_vector(c) for _, c in captions]) @ normalized([image_vector((250, 20, 40))])[0]).numpy()
    is_true = [rid == "rec7" for rid, _ in captions]
    order = sorted(range(len(captions)), key=lambda j: (-sims[j], is_true[j]))
    assert [(m.record.id, m.caption) for m in result.matches] == [captions[j] for j in order[:4]]
    assert result.true_match.rank == pessimistic_rank(list(sims), is_true)
    assert result.true_match.caption in records[7].captions


def test_query_rejects_unknown_true_id() -> None:
    with pytest.raises(ValueError, match="true id 'nope'"):
        text_query(FakeEncoder(), "r", colour_records(), ColorLoader(), true_id="nope")


@pytest.mark.filterwarnings("ignore:Glyph")
@pytest.mark.parametrize("query", ["rgb", "赤い円 $x^2$ الأحمر", "costs $5 and $6 – ça coûte"])
def test_plots_write_pngs(tmp_path, query: str) -> None:
    records = colour_records()
    captions = ("красный круг", "赤い 丸 $\\alpha", "دائرة حمراء")
    records[0] = Record("unicode", records[0].image, captions)
    model, loader = FakeEncoder(), ColorLoader()
    ranking = [m.record.id for m in text_query(model, query, records, loader, k=len(records)).matches]
    inside = text_query(model, query, records, loader, k=3, true_id=ranking[0])
    outside = text_query(model, query, records, loader, k=3, true_id=ranking[-1])
    sizes = {}
    for name, result in (("inside", inside), ("outside", outside)):
        path = plot_text_query(result, loader, tmp_path / name / "text.png")
        assert path.stat().st_size > 0
        with Image.open(path) as png:
            sizes[name] = png.size
    assert sizes["outside"][0] > sizes["inside"][0] > 0  # the true image gets an extra panel
    assert sizes["inside"][1] > 0

    result = image_query(model, loader.load(records[0].image), records, k=5, true_id="unicode")
    path = plot_image_query(result, tmp_path / "image.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 0 and png.size[1] > 0
    with pytest.raises(ValueError, match="image query"):
        plot_image_query(inside, tmp_path / "wrong.png")
