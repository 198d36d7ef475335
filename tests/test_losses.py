"""Golden values: every loss on small fixed tensors against a value worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from meal_cache import losses


def test_similarity_losses_golden_values():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    # |0|+|2|+|3|+|0| = 5 over 4 elements; squares 0+4+9+0 = 13 over 4.
    assert losses.l1_loss(s, t).item() == pytest.approx(1.25)
    assert losses.l2_loss(s, t).item() == pytest.approx(3.25)
    # cos([1,2],[1,0]) = 1/sqrt(5); cos([3,4],[0,4]) = 16/(5*4) = 0.8.
    assert losses.cosine_loss(s, t).item() == pytest.approx(1 - (1 / math.sqrt(5) + 0.8) / 2)


def test_soft_cross_entropy_golden_value():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax = [0.75, 0.25]
    # -(0.75 log 0.5 + 0.25 log 0.5) = log 2
    assert losses.soft_cross_entropy(student, teacher).item() == pytest.approx(math.log(2))
    # Equal inputs give the teacher's entropy: -(0.75 log 0.75 + 0.25 log 0.25).
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert losses.soft_cross_entropy(teacher, teacher).item() == pytest.approx(entropy)
    # Flattens (B, h, w) maps per sample.
    maps = torch.zeros(1, 2, 2)
    assert losses.soft_cross_entropy(maps, maps).item() == pytest.approx(math.log(4))


def test_soft_label_losses_golden_values():
    student = torch.tensor([[0.0, 0.0]])
    probs = torch.tensor([[0.75, 0.25]])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert losses.kd_kl(student, probs, temperature=1.0).item() == pytest.approx(kl)
    # T^2 scaling: with all-zero logits, softening changes nothing but the factor.
    assert losses.kd_kl(student, probs, temperature=4.0).item() == pytest.approx(16 * kl)
    assert losses.soft_label_ce(student, probs, temperature=2.0).item() == pytest.approx(4 * math.log(2))
    # The ensemble's soft targets are the mean of the teachers' softened probabilities.
    a = torch.tensor([[math.log(3.0), 0.0]])
    b = torch.tensor([[0.0, 0.0]])
    assert losses.soft_targets([a, b], 1.0)[0].tolist() == pytest.approx([0.625, 0.375])


def test_adversarial_losses_golden_values():
    real = torch.tensor([0.0, 0.0])
    fake = torch.tensor([0.0, 0.0])
    # BCE at score 0 is log 2 for either target.
    assert losses.discriminator_loss("bce", real, fake).item() == pytest.approx(math.log(2))
    assert losses.generator_loss("bce", fake).item() == pytest.approx(math.log(2))
    # Least squares: real wants 1, fake 0. Scores real=[1, 0], fake=[0.5, 0]: ((0 + 1)/2 + (0.25 + 0)/2) / 2.
    assert losses.discriminator_loss("ls", torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0])).item() == pytest.approx(
        0.3125
    )
    assert losses.generator_loss("ls", torch.tensor([0.5, 1.0])).item() == pytest.approx(0.125)
    assert losses.discriminator_accuracy(torch.tensor([1.0, -1.0]), torch.tensor([-2.0, -3.0]), "bce") == 0.75


def test_discriminator_learns_and_pushes_the_student_toward_the_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(256, 16) * 0.5 + 2.0
    student = torch.randn(256, 16) * 0.5
    disc = losses.MLPDiscriminator(16)
    optimizer = torch.optim.Adam(disc.parameters(), lr=5e-3)
    before = losses.discriminator_loss("bce", disc(teacher), disc(student)).item()
    for _ in range(100):
        loss = losses.discriminator_loss("bce", disc(teacher), disc(student))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = losses.discriminator_loss("bce", disc(teacher), disc(student)).item()
    assert after < before * 0.5
    assert losses.discriminator_accuracy(disc(teacher), disc(student), "bce") > 0.95

    # The generator's gradient, followed, moves student features toward the teacher's.
    features = student.clone().requires_grad_(True)
    losses.generator_loss("bce", disc(features)).backward()
    moved = features.detach() - 5.0 * features.grad
    distance = lambda x: (x.mean(0) - teacher.mean(0)).norm().item()  # noqa: E731
    assert distance(moved) < distance(student)


def test_conv_discriminator_for_grids_and_adapter_shapes():
    assert isinstance(losses.make_discriminator((8, 2, 2)), losses.ConvDiscriminator)
    assert isinstance(losses.make_discriminator((8, 1, 1)), losses.MLPDiscriminator)
    assert losses.make_discriminator((8, 2, 2))(torch.randn(3, 8, 2, 2)).shape == (3,)
    assert losses.Adapter(4, 9)(torch.randn(3, 4, 2, 2)).shape == (3, 9, 2, 2)


def test_a_large_maps_discriminator_pools_it_first_and_a_small_one_is_unchanged():
    from meal_cache.losses import MAP_DISCRIMINATOR_SIDE, MLPDiscriminator, PooledMapDiscriminator, make_discriminator

    torch.manual_seed(0)
    small = make_discriminator((16, 16))
    torch.manual_seed(0)
    assert isinstance(small, MLPDiscriminator)
    reference = MLPDiscriminator(256)
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), reference.state_dict().values(),
                                                 strict=True))  # fmt: skip
    large = make_discriminator((224, 224))
    assert isinstance(large, PooledMapDiscriminator) and large.size == (MAP_DISCRIMINATOR_SIDE,) * 2
    # A CIFAR-style network keeps a 224 x 224 first map at 224 px: an MLP on it would hold 1.26 G parameters.
    assert sum(p.numel() for p in large.parameters()) < 500_000
    maps = torch.rand(3, 224 * 224)
    pooled = torch.nn.functional.adaptive_avg_pool2d(maps.view(3, 1, 224, 224), MAP_DISCRIMINATOR_SIDE).flatten(1)
    assert torch.allclose(large(maps), large.mlp(pooled))
