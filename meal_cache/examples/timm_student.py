"""A timm student trained from a meal-cache store with timm's own optimizer and scheduler factories.

python examples/timm_student.py STORE TIMM_MODEL OUT.pt [EPOCHS]      (e.g. resnet10t)
"""

import sys

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from meal_cache import CachedViews, kd_loss

store, name, out = sys.argv[1:4]
epochs = int(sys.argv[4]) if len(sys.argv) > 4 else 10
temperature = 4.0

views = CachedViews(store, batch_size=64, seed=0, epochs=epochs, temperature=temperature, device="cpu")
model = timm.create_model(name, pretrained=False, num_classes=views.num_classes)
optimizer = create_optimizer_v2(model, opt="adamw", lr=2e-3, weight_decay=0.05)
scheduler, _ = create_scheduler_v2(
    optimizer, sched="cosine", num_epochs=epochs, warmup_epochs=1, step_on_epochs=False, updates_per_epoch=len(views)
)
step = 0
for epoch in range(epochs):
    model.train()
    correct = seen = 0
    for batch in views.epoch(epoch):
        logits = model(batch["pixels"])
        # Soft labels of the teachers' ensemble, plus the hard labels at a small weight (DeiT-style mix).
        loss = kd_loss(logits, batch["soft_targets"]["mean"], temperature) + 0.1 * F.cross_entropy(
            logits, batch["labels"]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        scheduler.step_update(step)
        correct += int((logits.argmax(1) == batch["labels"]).sum())
        seen += len(logits)
    print(f"epoch {epoch + 1}: loss {loss.item():.4f}  train top-1 {100 * correct / seen:.1f}%")
views.close()
torch.save(model.state_dict(), out)
