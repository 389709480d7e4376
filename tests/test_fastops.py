"""fastops.max_pool2 must equal F.max_pool2d, forward and (without ties) backward."""

import pytest
import torch
import torch.nn.functional as F

from slidecensus.fastops import max_pool2


@pytest.mark.parametrize("shape", [(3, 16, 32, 32), (2, 4, 8, 6), (5, 7, 7), (1, 2, 9, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_pool2_equals_torch_max_pool(shape, dtype):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    got, want = max_pool2(x), F.max_pool2d(x, 2)
    assert got.shape == want.shape
    assert torch.equal(got, want)


def test_max_pool2_gradient_goes_to_the_maximum():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    weights = torch.arange(48.0, dtype=torch.float64).reshape(1, 3, 4, 4)
    (max_pool2(a) * weights).sum().backward()
    (F.max_pool2d(b, 2) * weights).sum().backward()
    assert torch.equal(a.grad, b.grad)
