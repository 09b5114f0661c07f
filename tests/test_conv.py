"""LoRA on convolution layers, against PEFT on a small convolutional network."""

import json

import pytest
import torch
from safetensors.torch import save_file

import lorafuse
from conftest import quiet, read_tensors


class Net(torch.nn.Module):
    def __init__(self, groups: int = 1):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1, groups=groups)
        self.conv1x1 = torch.nn.Conv2d(8, 6, 1)
        self.conv1d = torch.nn.Conv1d(6, 6, 3, padding=1)

    def forward(self, x):
        y = self.conv1x1(self.conv(x))
        return self.conv1d(y.flatten(2))


def _save_base(net, folder):
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "custom"}))


def test_conv_lora_matches_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    quiet()
    torch.manual_seed(0)
    net = Net().eval()
    _save_base(net, tmp_path / "base")
    peft = get_peft_model(net, LoraConfig(r=2, lora_alpha=5, target_modules=["conv", "conv1x1", "conv1d"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = peft(x)
        merged_by_peft = peft.merge_and_unload().state_dict()
    report = lorafuse.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert report.tensors_merged == 3
    merged = read_tensors(tmp_path / "out")
    for key, value in merged_by_peft.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)
    from lorafuse.tools.verify import verify

    assert verify(tmp_path / "out", tmp_path / "base", tmp_path / "adapter") == []
    net2 = Net()
    net2.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(net2.eval()(x), expected, rtol=1e-5, atol=1e-5)


def test_grouped_conv_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    quiet()
    torch.manual_seed(0)
    net = Net(groups=2)
    _save_base(net, tmp_path / "base")
    get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["conv"], init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    with pytest.raises(lorafuse.LorafuseError, match="convolution"):
        lorafuse.plan(tmp_path / "base", tmp_path / "adapter")
