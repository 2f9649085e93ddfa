"""The Python API for online use, as the README shows it: DHR masks renewed inside a training
step (the paper's Sec. 3.3), and the torch DenseCRF as a drop-in post-processing step."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import dhr_label  # noqa: E402
from dhr_label import CRFParams, DHRParams  # noqa: E402
from dhr_label.core.prototypes import add_sums, finish, image_sums  # noqa: E402


class TinyNet(torch.nn.Module):
    """Stands for a WSS network: a class head (CAMs) over two backbone stages."""

    def __init__(self, classes: int = 21):
        super().__init__()
        self.c4 = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.c5 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = torch.nn.Conv2d(16, classes, 1)
        self.seg = torch.nn.Conv2d(16, classes, 1)

    def forward(self, x):
        c4 = torch.relu(self.c4(x))
        c5 = torch.relu(self.c5(c4))
        return self.head(c5), self.seg(c5), c4, c5


def test_masks_renewed_inside_a_training_step(device):
    torch.manual_seed(0)
    net, dino = TinyNet().to(device), torch.nn.Conv2d(3, 6, 8, stride=8).to(device)  # dino: the USS backbone
    optimiser = torch.optim.SGD(net.parameters(), lr=0.01)
    images = torch.rand(2, 3, 48, 64, device=device)
    tags = [torch.tensor([1, 15]), torch.tensor([7])]  # image-level labels (VOC ids)
    bases = torch.zeros(2, 48, 64, dtype=torch.uint8, device=device)  # the pipeline's base masks
    bases[0, 10:30, 10:40], bases[1, 5:20, 20:50] = 15, 7
    params = DHRParams(crf=CRFParams(backend="torch"))

    # -- as in the README ------------------------------------------------------------------
    with torch.no_grad():  # class prototypes from the base masks, e.g. once per epoch (here: this batch)
        _, _, p4, p5 = net(images)
        sums = None
        for b in range(2):
            host = lambda t: t.float().cpu().numpy()  # noqa: E731
            sums = add_sums(sums, image_sums(host(bases[b]).astype(np.uint8), host(dino(images[b : b + 1])[0]),
                                             [host(p4[b]), host(p5[b])], num_classes=21))
        prototypes = finish(sums)
    logits, seg, c4, c5 = net(images)
    with torch.no_grad():  # renew the pseudo-masks with DHR, on the device, no files
        uss = dino(images)
        rgb = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # B x H x W x 3 for the CRF
        states = dhr_label.refine_batch(
            [logits[b, t] for b, t in enumerate(tags)], tags, list(rgb), bases=list(bases),
            uss=list(uss), wss=[[c4[b], c5[b]] for b in range(2)], background=0, params=params,
            prototypes=prototypes,
        )
        targets = torch.stack([s.mask for s in states]).long()  # 255 where ignored
    loss = F.cross_entropy(F.interpolate(seg, size=(48, 64), mode="bilinear"), targets, ignore_index=255)
    loss.backward()
    optimiser.step()
    # ------------------------------------------------------------------------------------
    assert targets.shape == (2, 48, 64) and targets.device.type == torch.device(device).type
    assert set(torch.unique(targets[0]).tolist()) <= {0, 1, 15} and set(torch.unique(targets[1]).tolist()) <= {0, 7}
    assert torch.isfinite(loss)
    assert prototypes.uss.shape == (21, 6) and len(prototypes.wss) == 2


def test_dense_crf_as_a_drop_in_post_processing_step(device):
    rng = np.random.default_rng(1)
    images = torch.as_tensor(rng.integers(0, 256, (2, 40, 56, 3), dtype=np.uint8), device=device)
    cams = torch.as_tensor(rng.uniform(0, 1, (2, 4, 40, 56)).astype(np.float32), device=device)
    # -- as in the README: IRN's CRF step, batched on the GPU ------------------------------
    probs = torch.softmax(cams * 5, dim=1)
    q = dhr_label.dense_crf(images, probs, CRFParams(gauss_sxy=3, gauss_compat=3, bilateral_sxy=50,
                                                     bilateral_srgb=5, bilateral_compat=10))
    labels = q.argmax(dim=1)
    # ------------------------------------------------------------------------------------
    from dhr_label.core.crf.pydense import PydenseCRF

    reference = [PydenseCRF(images[b].cpu().numpy(), CRFParams(gauss_sxy=3, gauss_compat=3, bilateral_sxy=50,
                                                                 bilateral_srgb=5, bilateral_compat=10)).labels(probs[b].cpu().numpy())
                 for b in range(2)]
    same = np.mean([np.mean(labels[b].cpu().numpy() == reference[b]) for b in range(2)])
    assert labels.shape == (2, 40, 56) and same >= 0.995
