"""The methods of the comparison: masking, text tower and zero-shot head, dual loss, LoRA, probe, WiSE-FT."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPModel, SiglipModel

from vlfit.config import load_config
from vlfit.losses import class_contrastive_loss
from vlfit.metrics import MetricsLog
from vlfit.models import ImageClassifier, build_backbone, load_backbone
from vlfit.models.masking import AttentiveMasking, RandomMasking, cls_attention, probe_attention
from vlfit.task import build_classifier, build_task
from vlfit.train import train
from vlfit.zeroshot import zeroshot

QUICK = ["data.num_images=150", "data.image_size=64", "train.epochs=2", "train.micro_batch=32"]
CLASSES = ["calling", "clapping", "cycling", "listening_to_music"]


def run(tmp_path, overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    summary = train(load_config(None, [*QUICK, *overrides]), tmp_path, show=False)
    return summary, MetricsLog.read(tmp_path / "metrics.jsonl")


# ---------------------------------------------------------------- text tower and zero-shot head


@pytest.mark.parametrize("fixture,full_class", [("clip_dir", CLIPModel), ("siglip_dir", SiglipModel)])
def test_full_checkpoint_splits_into_towers_that_match_transformers(fixture, full_class, request):
    from transformers import AutoTokenizer

    path = request.getfixturevalue(fixture)
    loaded = load_backbone(str(path), with_text=True)
    reference = full_class.from_pretrained(path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = loaded.backbone.eval()(x)
        theirs = reference.vision_model(pixel_values=x).pooler_output
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        texts = ["a photo of a person calling.", "a photo of a person cycling."]
        tok = AutoTokenizer.from_pretrained(path)  # the fixture's own, as the hub repo ships it
        padding = "max_length" if fixture == "siglip_dir" else True
        batch = tok(texts, padding=padding, truncation=True, max_length=reference.config.text_config.max_position_embeddings,
                    return_tensors="pt")
        out = reference.text_model(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"] if fixture == "clip_dir" else None)
        expected = out.pooler_output
        if fixture == "clip_dir":
            expected = reference.text_projection(expected)
        torch.testing.assert_close(loaded.text.eval()(texts), F.normalize(expected, dim=-1))


def test_zero_shot_head_is_scaled_cosine_to_class_prompts():
    cfg = load_config(None, ["model.head=zeroshot"])
    torch.manual_seed(0)
    classifier, text = build_classifier(cfg, CLASSES)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        class_emb = text.class_embeddings(CLASSES)
        image_emb = F.normalize(classifier.backbone.project(classifier.backbone(x)), dim=-1)
        expected = text.logit_scale.exp() * image_emb @ class_emb.t()
        torch.testing.assert_close(classifier.eval()(x), expected)
    prompts = text.tokenizer.batch_decode(text.tokenizer(["a photo of a person listening to music."])["input_ids"])
    assert "listening to music" in prompts[0]  # underscores became spaces, every word known


def test_zeroshot_command_scores_without_training():
    result = zeroshot(load_config(None, ["data.num_images=150", "data.image_size=64"]))
    assert result["images"] == 30 and 0.0 <= result["val_acc"] <= 1.0 and math.isfinite(result["val_loss"])


# ---------------------------------------------------------------- token masking


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
def test_keeping_every_token_is_the_unmasked_model(name):
    backbone = build_backbone(name).eval()
    x = torch.randn(2, 3, 64, 64)
    every = torch.arange(backbone.grid ** 2).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x, every), backbone(x), rtol=0, atol=0)
    for masker in (RandomMasking(1.0), AttentiveMasking(backbone, 1.0)):
        assert masker.train()(x, backbone) is None  # ratio 1.0: nothing to choose
    assert RandomMasking(0.5).eval()(x, backbone) is None  # never masks at evaluation


def test_keep_ratio_one_trains_exactly_like_no_mask(tmp_path):
    _, plain = run(tmp_path / "plain", [])
    _, masked = run(tmp_path / "masked", ["model.mask.kind=random", "model.mask.keep_ratio=1.0"])
    drop = {"epoch_time_s", "train_images_per_s", "peak_mem_mb", "masked", "kept_tokens", "kept_token_fraction",
            "saliency_time_s", "train_images_per_s_per_process", "peak_mem_mb_per_process"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in plain] == \
           [{k: v for k, v in r.items() if k not in drop} for r in masked]


def test_random_masking_keeps_cls_and_a_fraction_of_patches():
    backbone = build_backbone("tiny-clip")
    keep = RandomMasking(0.25).train()(torch.randn(4, 3, 64, 64), backbone)
    assert keep.shape == (4, 16) and all(len(set(row.tolist())) == 16 for row in keep)
    tokens = backbone.embed(torch.randn(4, 3, 64, 64))
    from vlfit.models.backbones import select_tokens

    kept = select_tokens(tokens, keep, 1)
    assert kept.shape == (4, 17, 128) and torch.equal(kept[:, 0], tokens[:, 0])  # CLS first, always kept
    torch.testing.assert_close(kept[:, 1:], torch.stack([tokens[i, 1:][keep[i]] for i in range(4)]))


def test_attentive_masking_keeps_the_most_salient_patches():
    masker = AttentiveMasking(build_backbone("tiny-clip"), keep_ratio=0.25)  # 8x8 grid -> keep 16
    saliency = torch.rand(2, 64)
    planted = torch.tensor([[3, 9, 10, 17, 20, 22, 30, 33, 40, 41, 42, 50, 55, 60, 61, 63],
                            list(range(0, 64, 4))])
    saliency.scatter_(1, planted, 5.0)
    assert torch.equal(masker.select(saliency), planted)


def test_attentive_masking_in_blocks_keeps_whole_salient_cells():
    # 4x4 cells of 2x2; A-CLIP's count keeps int(16 * 0.2) + 1 = 4 of them
    masker = AttentiveMasking(build_backbone("tiny-clip"), keep_ratio=0.2, block=2)
    saliency = torch.zeros(1, 8, 8)
    for r, c in [(0, 0), (1, 3), (2, 1), (3, 3)]:  # four cells out of sixteen
        saliency[0, 2 * r:2 * r + 2, 2 * c:2 * c + 2] = 1.0
    keep = masker.select(saliency.flatten(1))
    rows, cols = keep[0] // 8, keep[0] % 8
    assert keep.shape == (1, 16) and set(zip((rows // 2).tolist(), (cols // 2).tolist())) == \
           {(0, 0), (1, 3), (2, 1), (3, 3)}


@pytest.mark.parametrize("last_only", [False, True])
def test_cls_saliency_matches_the_models_own_attention(last_only):
    backbone = build_backbone("tiny-clip", attn_implementation="eager").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        attentions = backbone.tower(pixel_values=x, output_attentions=True).attentions  # (B, H, N, N) per layer
        used = attentions[-1:] if last_only else attentions
        expected = torch.stack([a[:, :, 0, 1:].mean(dim=1) for a in used]).mean(dim=0)
        torch.testing.assert_close(cls_attention(backbone, x, last_only), expected)


def test_siglip_saliency_is_the_probe_attention():
    backbone = build_backbone("tiny-siglip").eval()
    saliency = probe_attention(backbone, torch.randn(2, 3, 64, 64))
    assert saliency.shape == (2, 64)
    torch.testing.assert_close(saliency.sum(dim=1), torch.ones(2))  # a distribution over the patches


def test_ema_teacher_follows_and_frozen_teacher_stays():
    online = build_backbone("tiny-clip")
    ema, frozen = AttentiveMasking(online, 0.5, "ema"), AttentiveMasking(online, 0.5, "frozen")
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    ema.update_teacher(online, progress=0.0)
    frozen.update_teacher(online, progress=0.0)
    w_online, w_ema, w_frozen = (m.tower.embeddings.patch_embedding.weight for m in (online, ema.teacher, frozen.teacher))
    torch.testing.assert_close(w_ema, w_frozen + 0.004, rtol=0, atol=1e-5)  # moved 1 - 0.996 of the way
    assert not torch.equal(w_frozen, w_online)
    assert ema.momentum_at(0.0) == pytest.approx(0.996) and ema.momentum_at(1.0) == pytest.approx(1.0)
    assert not any(p.requires_grad for p in ema.teacher.parameters())


def test_masking_cuts_encoder_tokens_and_flops():
    """At keep 0.5, a tiny-CLIP training step encodes half the patches, in fewer FLOPs (the time it saves
    is measured by `vlfit bench`, not asserted here)."""
    torch.manual_seed(0)
    backbone = build_backbone("tiny-clip")
    model = ImageClassifier(backbone, 15)
    x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 15, (32,))
    seen = []
    backbone.tower.encoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[1]),
                                                     with_kwargs=True)

    def flops(masker):
        keep = masker.train()(x, backbone)
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(x, keep), y).backward()
        return counter.get_total_flops()

    full, half = flops(RandomMasking(1.0)), flops(RandomMasking(0.5))
    assert seen == [65, 33]  # CLS + 64 patches, then CLS + 32
    assert half < 0.6 * full


def test_masked_runs_record_kept_tokens_and_saliency_time(tmp_path):
    _, records = run(tmp_path, ["model.mask.kind=attentive", "model.mask.block=2"])
    # 8x8 patches in 16 cells of 2x2: A-CLIP keeps int(16 * 0.5) + 1 = 9 cells, 36 patches
    assert all(r["kept_tokens"] == 36 and r["kept_token_fraction"] == 36 / 64 and r["saliency_time_s"] > 0
               for r in records)
    assert (tmp_path / "checkpoints" / "best" / "model.safetensors").is_file()
    # Example masks for the report: validation images as the model sees them, 9 of their 16 2x2 cells kept.
    examples = np.load(tmp_path / "mask_examples.npz")
    images, keep = examples["images"], examples["keep"]
    assert images.dtype == np.uint8 and images.shape[1:] == (64, 64, 3) and images.std() > 0
    assert keep.shape == (len(images), 8, 8) and (keep.reshape(len(images), -1).sum(1) == 36).all()
    assert (keep[:, ::2, ::2] == keep[:, 1::2, 1::2]).all()  # whole 2x2 blocks
    assert len(examples["titles"]) == len(images)


def test_unmasked_epochs_switch_off_the_masker_and_its_teacher():
    cfg = load_config(None, ["model.mask.kind=attentive", "train.epochs=3", "model.mask.unmasked_epochs=1"])
    classifier, text = build_classifier(cfg, CLASSES)
    task = build_task(cfg, classifier, text, CLASSES).train()
    with torch.no_grad():
        for p in classifier.backbone.parameters():
            p.add_(1.0)  # the online tower moves away from the teacher, which the EMA would follow
    teacher = task.masker.teacher.tower.embeddings.patch_embedding.weight
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    for epoch, masked in [(2, True), (3, False), (1, True)]:  # the phase follows the epoch, in any order
        task.start_epoch(epoch)
        before = teacher.clone()
        task(x, y)
        task.after_optimizer_step(progress=0.5)
        stats = task.epoch_stats()
        assert (stats["masked"], stats["kept_token_fraction"]) == (masked, 0.5 if masked else 1.0)
        assert (stats["saliency_time_s"] > 0) == masked
        assert torch.equal(teacher, before) != masked


def test_a_run_too_short_for_its_unmasked_phase_keeps_one_epoch_masked(caplog):
    for epochs, unmasked in [(1, 0), (3, 2)]:
        cfg = load_config(None, ["model.mask.kind=random", f"train.epochs={epochs}", "model.mask.unmasked_epochs=3"])
        classifier, text = build_classifier(cfg, CLASSES)
        with caplog.at_level("WARNING", logger="vlfit.task"):
            task = build_task(cfg, classifier, text, CLASSES)
        assert task.masked_epochs == epochs - unmasked
        assert f"3 of {epochs} epochs would leave none masked" in caplog.text


def test_unmasked_final_epochs_see_every_token_and_change_nothing_else(tmp_path, monkeypatch):
    calls = []
    saliency = AttentiveMasking.saliency
    monkeypatch.setattr(AttentiveMasking, "saliency", lambda self, x: calls.append(len(x)) or saliency(self, x))
    flip = ["model.mask.kind=attentive", "model.mask.block=2", "train.epochs=3"]
    _, records = run(tmp_path / "flip", [*flip, "model.mask.unmasked_epochs=1"])
    # The teacher ran on the 3 micro-batches of epochs 1 and 2 only, then on the report's 6 examples.
    assert calls == [32, 32, 32] * 2 + [6]
    _, masked = run(tmp_path / "masked", flip)
    assert [(r["masked"], r["kept_tokens"], r["kept_token_fraction"]) for r in records] == \
           [(True, 36, 36 / 64), (True, 36, 36 / 64), (False, 64, 1.0)]  # 9 of 16 cells of 2 x 2
    assert records[0]["saliency_time_s"] > 0 and records[1]["saliency_time_s"] > 0
    assert records[2]["saliency_time_s"] == 0.0
    # The masked epochs are those of a run without the phase; the learning rate schedule goes on alike.
    timing = {"epoch_time_s", "train_images_per_s", "peak_mem_mb", "saliency_time_s",
              "train_images_per_s_per_process", "peak_mem_mb_per_process"}
    same = lambda r: {k: v for k, v in r.items() if k not in timing}  # noqa: E731
    assert [same(r) for r in records[:2]] == [same(r) for r in masked[:2]]
    assert (records[2]["lr"], records[2]["step"]) == (masked[2]["lr"], masked[2]["step"])
    assert records[2]["train_loss"] != masked[2]["train_loss"]
    assert "unmasked_epochs: 1" in (tmp_path / "flip" / "config.yaml").read_text()


# ---------------------------------------------------------------- dual loss


def test_contrastive_loss_does_not_push_same_class_images_apart():
    class_emb = torch.eye(4)
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    image_emb = class_emb[labels]  # perfect: every image sits on its class prompt, duplicates included
    scale = torch.tensor(math.log(100.0))
    ours = class_contrastive_loss(image_emb, class_emb, labels, scale)
    # The naive FLYP form, one caption per image, treats the duplicate as a negative.
    logits = scale.exp() * image_emb @ class_emb[labels].t()
    naive = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6))) / 2
    assert ours < 1e-3 and naive > 0.4
    sig = class_contrastive_loss(image_emb, class_emb, labels, torch.tensor(math.log(20.0)), torch.tensor(-10.0))
    assert sig < 0.01


def test_contrastive_loss_gradient_pulls_images_to_their_class():
    class_emb = torch.eye(8)[:3]  # orthonormal prompts: the pull toward one is not a pull toward another
    labels = torch.tensor([0, 1, 2, 0])
    for bias in (None, torch.tensor(-5.0)):
        image_emb = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
        loss = class_contrastive_loss(image_emb, class_emb, labels, torch.tensor(math.log(10.0)), bias)
        loss.backward()
        step = -image_emb.grad
        assert all((step[i] @ class_emb[labels[i]]) > 0 for i in range(4))


@pytest.mark.parametrize("backbone,train_text", [("tiny-clip", False), ("tiny-siglip", True)])
def test_dual_loss_runs_and_text_tower_trains_only_when_asked(tmp_path, backbone, train_text):
    cfg = load_config(None, [*QUICK, f"model.backbone={backbone}", "loss.contrastive_weight=0.5",
                             f"loss.train_text={str(train_text).lower()}"])
    classifier, text = build_classifier(cfg, CLASSES)
    task = build_task(cfg, classifier, text, CLASSES)
    assert any(p.requires_grad for p in task.text.parameters()) == train_text
    out = task.train()(torch.randn(4, 3, 64, 64), torch.tensor([0, 0, 1, 3]))
    plain = F.cross_entropy(out["logits"], torch.tensor([0, 0, 1, 3]))
    assert out["loss"] > plain  # the contrastive term is added


# ---------------------------------------------------------------- fine-tuning modes


def test_lora_trains_only_adapters_and_head(tmp_path):
    summary, _ = run(tmp_path, ["model.finetune=lora"])
    cfg = load_config(None, [*QUICK, "model.finetune=lora"])
    torch.manual_seed(cfg.train.seed)
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    initial, _ = build_classifier(cfg, list(range(15)))
    before = initial.state_dict()
    after = load_file(tmp_path / "checkpoints" / "last" / "model.safetensors")
    assert before.keys() == after.keys() and any("lora_A" in k for k in after)
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k or k.startswith("head.") for k in changed)
    assert any("lora_B" in k for k in changed) and "head.weight" in changed
    total = sum(v.numel() for v in after.values())
    assert summary["trainable_params"] < 0.1 * total


def test_linear_probe_leaves_backbone_bit_identical(tmp_path):
    summary, records = run(tmp_path, ["model.finetune=linear_probe", "train.epochs=3", "train.lr=1e-2"])
    from accelerate.utils import set_seed

    set_seed(0)
    initial, _ = build_classifier(load_config(None, [*QUICK, "model.finetune=linear_probe"]), list(range(15)))
    after = load_file(tmp_path / "checkpoints" / "last" / "model.safetensors")
    before = initial.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("backbone."))
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert summary["trainable_params"] == 15 * 128 + 15
    assert records[-1]["train_loss"] < records[0]["train_loss"]


def test_wise_ft_endpoints_reproduce_zero_shot_and_fine_tuned(tmp_path):
    overrides = ["model.head=zeroshot", "wise_ft.alphas=[0.0, 0.5, 1.0]"]
    _, records = run(tmp_path, overrides)
    sweep = json.loads((tmp_path / "wise_ft.json").read_text())
    assert [r["alpha"] for r in sweep] == [0.0, 0.5, 1.0]
    zs = zeroshot(load_config(None, [*QUICK, *overrides]))
    assert sweep[0]["val_acc"] == zs["val_acc"] and sweep[0]["val_loss"] == pytest.approx(zs["val_loss"], abs=1e-6)
    assert sweep[-1]["val_acc"] == records[-1]["val_acc"]
    assert sweep[-1]["val_loss"] == pytest.approx(records[-1]["val_loss"], abs=1e-6)


def test_layer_decay_scales_learning_rate_by_depth():
    from vlfit.train import make_optimizer

    cfg = load_config(None, ["train.layer_decay=0.5", "train.lr=1.0"])
    classifier, text = build_classifier(cfg, CLASSES)
    opt = make_optimizer(build_task(cfg, classifier, text, CLASSES), cfg.train, fused=False)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    tower = classifier.backbone.tower
    assert lr_of[id(classifier.head.weight)] == 1.0
    assert lr_of[id(tower.encoder.layers[3].mlp.fc1.weight)] == 0.5
    assert lr_of[id(tower.encoder.layers[0].mlp.fc1.weight)] == 0.5 ** 4
    assert lr_of[id(tower.embeddings.patch_embedding.weight)] == 0.5 ** 5
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(tower.encoder.layers[0].mlp.fc1.bias)] == 0.0 and decays[id(classifier.head.weight)] > 0
