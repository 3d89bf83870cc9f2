"""The training step's speed options: gradient checkpointing, torch.compile, and no host syncs per step."""

import pytest
import torch

from vlfit.config import TrainConfig, load_config
from vlfit.models import ImageClassifier, load_backbone
from vlfit.task import FineTuner
from vlfit.train import speed_options


def classifier(seed=0):
    torch.manual_seed(seed)
    return ImageClassifier(load_backbone("tiny-clip").backbone, num_classes=5)


def step(model, x, y):
    """One forward + backward; returns (loss, {name: grad}) and how often the first layer's MLP ran."""
    calls = []
    # a pre-hook: the recomputation stops as soon as it has every saved tensor, before modules finish
    hook = model.backbone.encoder_layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    hook.remove()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)


def test_grad_checkpointing_recomputes_layers_and_keeps_gradients():
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    plain = classifier().train()
    ckpt = classifier().train()
    speed_options(ckpt, TrainConfig(grad_checkpointing=True))
    loss_a, grads_a, calls_a = step(plain, x, y)
    loss_b, grads_b, calls_b = step(ckpt, x, y)
    assert (calls_a, calls_b) == (1, 2)  # the backward pass ran the layer again
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        ckpt.eval()(x)  # no recomputation, and no error, without gradients


@pytest.mark.slow
def test_compiled_backbone_gives_the_same_step_and_checkpoint_keys():
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    plain = classifier().train()
    compiled = classifier().train()
    speed_options(compiled, TrainConfig(compile=True))
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints stay loadable
    loss_a, grads_a, _ = step(plain, x, y)
    loss_b, grads_b, _ = step(compiled, x, y)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-4, atol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-3, atol=1e-5, msg=name)


def test_speed_keys_validate():
    cfg = load_config(None, ["train.compile=true", "train.grad_checkpointing=true", "data.pipeline=torchvision"])
    assert cfg.train.compile and cfg.train.grad_checkpointing and cfg.data.pipeline == "torchvision"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_epoch_waits_for_the_gpu_only_at_its_end(tmp_path):
    """The real loop over the cached pipeline, bf16, with CUDA reporting every host synchronisation."""
    import warnings

    import numpy as np
    from accelerate.utils import set_seed

    from vlfit.console import EpochView
    from vlfit.data import ImageSet
    from vlfit.data.gpu_transforms import on_device
    from vlfit.data.split import Split
    from vlfit.checkpoint import Checkpoints
    from vlfit.metrics import RunningMetrics, TensorBoardLog
    from vlfit.resilience import GracefulStop, NonFiniteGuard, Safeguards
    from vlfit.resume import Progress
    from vlfit.data.loaders import make_loaders
    from vlfit.train import make_accelerator, make_optimizer, train_one_epoch

    cfg = load_config(None, ["train.micro_batch=8", "train.device=cuda", f"data.cache_dir={tmp_path}"])
    accelerator = make_accelerator(cfg.train)
    set_seed(0)
    rng = np.random.default_rng(0)
    images = ImageSet([rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(48)], np.arange(48) % 5,
                      list("abcde"), [f"x{i}" for i in range(48)])
    model = FineTuner(classifier(), images.classes)
    pre = model.classifier.backbone.preprocess
    train_loader, _ = make_loaders(cfg, images, Split(np.arange(48), np.arange(0)), pre)
    optimizer = make_optimizer(model, cfg.train, fused=True)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    loader = on_device(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def epoch():
        guard = NonFiniteGuard(10, scaler=False)
        safeguards = Safeguards(Checkpoints(tmp_path / "checkpoints"), {}, {}, guard, GracefulStop(), tmp_path)
        train_one_epoch(model, loader, optimizer, scheduler, accelerator, cfg.train,
                        Progress(RunningMetrics(accelerator.device)), EpochView(enabled=False), safeguards,
                        TensorBoardLog(tmp_path, enabled=False), 100)

    epoch()  # warm-up: allocator, kernels, pinned buffers
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            epoch()  # 6 steps
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    # The non-finite guard reads each step's flag one step later (the GPU stays a step ahead), and the
    # loss and accuracy sums are read once, at the end of the epoch.
    assert len(syncs) <= 6 + 2, syncs
