"""GaussianDataModule: exact batches, determinism, DDP-rank distinctness, validation set, resume."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from l2m.data.gaussian import GaussianFamily
from l2m.data.gaussian import GaussianDataModule


def make_dm(**kw):
    return GaussianDataModule(**{"levels": 2, "copies": 3, "batch_size": 2, "val_size": 5, **kw})


def first_train_batches(dm, n):
    batches = []
    for batch in dm.train_dataloader():
        batches.append(dm.on_after_batch_transfer(batch, 0))
        if len(batches) == n:
            return batches
    return batches


def test_batches_are_exact_and_shaped_per_contract():
    dm = make_dm()
    assert dm.seq_len == 16 and dm.task == "gaussian"
    assert dm.io_config() == {"kind": "gaussian", "dim": 3}
    fam = GaussianFamily(2, copies=3)
    assert dm.bipartite_mi_half() == pytest.approx(fam.bipartite_mi(), rel=1e-15)
    torch.testing.assert_close(dm.nll_floor(), fam.conditional_entropy())

    batch = first_train_batches(dm, 1)[0]
    assert batch["x"].shape == (2, 17, 3) and batch["x"].dtype == torch.float32
    assert torch.equal(batch["x"][:, 0], torch.zeros(2, 3))
    mean, std = fam.conditional(batch["x"])  # triangular-solve path agrees with the noise path
    torch.testing.assert_close(batch["mean"], mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(batch["std"].expand_as(std), std, rtol=0, atol=0)


def test_train_stream_is_deterministic_fresh_and_distinct_per_seed_and_rank():
    a, b = first_train_batches(make_dm(), 3), first_train_batches(make_dm(), 3)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    xs = [batch["x"] for batch in a]
    assert not torch.equal(xs[0], xs[1]) and not torch.equal(xs[1], xs[2])  # fresh every step
    other_seed = first_train_batches(make_dm(seed=1), 1)[0]["x"]
    assert not torch.allclose(other_seed, xs[0])

    # The noise of batch k on rank r is keyed by (seed, r, k): every rank draws its own samples.
    dm = make_dm()
    noise = {(r, k): dm.train_noise(k, rank=r) for r in range(4) for k in range(3)}
    keys = list(noise)
    for i, p in enumerate(keys):
        for q in keys[i + 1 :]:
            assert not torch.allclose(noise[p], noise[q]), (p, q)
    torch.testing.assert_close(dm.family.from_noise(noise[(0, 0)])["x"], a[0]["x"], rtol=0, atol=0)


def test_workers_yield_the_same_stream_in_the_same_order():
    serial = first_train_batches(make_dm(), 4)
    parallel = first_train_batches(make_dm(num_workers=2), 4)
    for x, y in zip(serial, parallel):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_validation_set_is_fixed_and_sharded_without_overlap():
    dm = make_dm()
    full = torch.cat([dm.on_after_batch_transfer(b, 0)["x"] for b in dm.val_dataloader()])
    again = torch.cat([dm.on_after_batch_transfer(b, 0)["x"] for b in make_dm(seed=7).val_dataloader()])
    assert full.shape == (5, 17, 3)
    torch.testing.assert_close(full, again, rtol=0, atol=0)  # own seed: independent of the train seed
    other = make_dm(val_seed=1)
    assert not torch.allclose(full, other.family.from_noise(other.val_noise(range(5)))["x"])

    for world in (1, 2, 3):
        shards = [dm.val_indices(r, world) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(5))
        for r, shard in enumerate(shards):  # a shard holds exactly those sequences of the full set
            torch.testing.assert_close(dm.family.from_noise(dm.val_noise(shard))["x"], full[shard])
    with pytest.raises(ValueError, match="val_size"):
        dm.val_indices(0, 6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"levels": 9}, "levels"),
        ({"kind": "linear"}, "kind"),
        ({"copies": 0}, "copies"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"val_size": 0}, "val_size must be an int >= 1"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"num_workers": -1}, "num_workers"),
        ({"epoch_size": 0}, "epoch_size"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_dm(**kwargs)


class Recorder(L.LightningModule):
    """A one-parameter model that records every batch it trains and validates on."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.train_x, self.val_x = [], []

    def training_step(self, batch, batch_idx):
        self.train_x.append(batch["x"].clone())
        z = batch["x"][:, 1:]
        return ((self.scale * batch["mean"] - z) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.val_x.append(batch["x"].clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(max_steps, ckpt_dir=None, ckpt_path=None, every=None):
    """Train Recorder for max_steps; without a checkpoint to resume from, starts from scratch."""
    model, dm = Recorder(), make_dm(epoch_size=3, val_size=3)
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=bool(every),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, dm


def test_resumed_run_sees_the_batches_of_an_uninterrupted_run(tmp_path):
    # Epochs of 3 batches; the checkpoint at step 4 lies mid-epoch.
    full, full_dm = fit(8)
    assert full_dm.batches_served == 8
    assert len({tuple(x.flatten()[:4].tolist()) for x in full.train_x}) == 8  # never reused

    first, _ = fit(4, ckpt_dir=tmp_path, every=4)
    (ckpt,) = tmp_path.glob("*step=4*.ckpt")
    state = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state == [{"batches_served": 4}]
    resumed, _ = fit(8, ckpt_dir=tmp_path, ckpt_path=ckpt, every=4)  # the same command, resumed

    seen = first.train_x + resumed.train_x
    assert len(seen) == len(full.train_x) == 8
    for x, y in zip(seen, full.train_x):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(resumed.scale, full.scale)
    # The validation set (3 sequences: batches of 2 and 1) never changes.
    val_runs = [torch.cat(xs[i : i + 2]) for xs in (full.val_x, resumed.val_x) for i in range(0, len(xs), 2)]
    assert len(val_runs) >= 3
    for x in val_runs:
        torch.testing.assert_close(x, val_runs[0], rtol=0, atol=0)


class RankRecorder(Recorder):
    """Recorder that saves what its DDP rank saw, since spawned processes do not return it."""

    def __init__(self, out_dir):
        super().__init__()
        self.out_dir = str(out_dir)

    def on_train_end(self):
        torch.save({"train": self.train_x, "val": self.val_x}, f"{self.out_dir}/rank{self.global_rank}.pt")


def test_ddp_ranks_draw_distinct_batches_and_share_validation(tmp_path):
    dm = make_dm(epoch_size=3, val_size=3)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(RankRecorder(tmp_path), datamodule=dm)
    seen = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank, record in enumerate(seen):
        assert len(record["train"]) == 3
        for k, x in enumerate(record["train"]):  # batch k of rank r is keyed by (seed, r, k)
            torch.testing.assert_close(x, dm.family.from_noise(dm.train_noise(k, rank))["x"], rtol=0, atol=0)
    for x0, x1 in zip(seen[0]["train"], seen[1]["train"]):
        assert not torch.allclose(x0, x1)
    # Validation: rank 0 holds sequences 0 and 2, rank 1 sequence 1 — together the whole set.
    full = dm.family.from_noise(dm.val_noise(range(3)))["x"]
    torch.testing.assert_close(seen[0]["val"][0], full[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(seen[1]["val"][0], full[[1]], rtol=0, atol=0)


def test_a_batch_of_gigabytes_is_announced_before_the_first_step(caplog):
    caplog.set_level("INFO", logger="l2m.data.gaussian.datamodule")
    GaussianDataModule(levels=3, copies=64, batch_size=16)
    assert "needs about" not in caplog.text
    GaussianDataModule(levels=3, copies=30_000, batch_size=16, val_size=256)
    assert ("a batch of 16 sequences x L=64 x 30,000 copies needs about 2 GB of memory (its noise, sequences and "
            "conditionals, the model's predictions and their gradients): every step takes a while, and so does the "
            "held-out evaluation before the first (16 batches)") in caplog.text
