"""Knowledge distillation from a meal-cache store in a plain PyTorch loop.

With the same settings it trains the student `meal-cache distill --method kd` trains (tests/test_cached_views.py):
    python examples/kd_loop.py STORE STUDENT_ARCH OUT.pt [EPOCHS] [BATCH_SIZE] [SEED]
"""

import math
import sys

import torch

from meal_cache import CachedViews, kd_loss, save_student
from meal_cache.nets.models import create_model

store, arch, out = sys.argv[1:4]
epochs, batch_size, seed = (int(v) for v in (sys.argv[4:7] + ["30", "64", "0"][len(sys.argv[4:7]) :]))
lr, temperature, warmup_epochs = 0.05, 4.0, 1  # distill's defaults

views = CachedViews(store, batch_size=batch_size, seed=seed, epochs=epochs, temperature=temperature, device="cpu")
torch.manual_seed(seed)
student = create_model(arch, views.num_classes, views.dataset.image_size)
optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
steps, warmup = len(views) * epochs, len(views) * warmup_epochs


def rate(step: int) -> float:  # linear warm-up, then cosine to zero (the lr factor of each step)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
for epoch in range(epochs):
    torch.manual_seed(seed * 10_007 + epoch)  # in-model randomness (dropout) per epoch, as distill seeds it
    student.train()
    for batch in views.epoch(epoch):
        logits = student(batch["pixels"])
        loss = kd_loss(logits, batch["soft_targets"]["mean"], temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    print(f"epoch {epoch + 1}: loss {loss.item():.4f}")
views.close()
save_student(student, out, arch=arch, dataset=views.dataset)  # a checkpoint `meal-cache evaluate OUT.pt` reads
