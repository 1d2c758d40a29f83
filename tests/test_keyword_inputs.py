"""Issue 37: inputs of several parts — a tokenizer's {"input_ids", "attention_mask"} per example — travel packed
[P, L] through every data path and reach the user's network as its keyword arguments; exports take them by name;
int8 runs on them; and a dict the packing cannot hold is one line."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from core.errors import SearchsvcError
from searchsvc.candidates import export_model
from workers.data.datasets import DatasetConfig, load_dataset
from workers.measurement import ort
from workers.measurement.measure import count_macs
from workers.models.inputs import InputSpec
from workers.models.user_model import ModelSource, construct

TEXT = {"train": 96, "val": 16, "test": 32, "length": 12, "vocab": 48}
ENCODER = ModelSource("examples.text:encoder", {"vocab": 48, "length": 12, "dim": 16, "heads": 2, "layers": 1})


def _splits(masks: bool = True, **kwargs):
    return load_dataset(DatasetConfig(name="python", factory="examples.text:sentiment", in_memory=True,
                                      kwargs={**TEXT, **kwargs, "masks": masks}))


def test_a_dict_per_example_is_packed_in_its_order_and_the_spec_names_the_parts():
    splits = _splits()
    ids, labels = splits.train
    assert ids.shape == (len(labels), 2, 12) and ids.dtype == torch.int64
    assert torch.equal(ids[:, 1], (ids[:, 0] != 0).long())  # the mask, as the example's tokenizer made it
    inputs = splits.inputs
    assert inputs.parts == ("input_ids", "attention_mask") and inputs.tokens == 48 and not inputs.is_image
    assert InputSpec.from_meta(inputs.meta()) == inputs  # a stored teacher reads back the same spec
    assert "input_ids, attention_mask: 12 integers each" in str(inputs)
    batch = inputs.batch(4, random=True)
    assert (batch[:, 1] == 1).all() and batch[:, 0].max() < 48  # random ids, masks attending everywhere


def test_the_network_gets_its_keyword_arguments_and_keeps_its_names_and_state():
    inputs = _splits().inputs
    model = construct(ENCODER, inputs).eval()
    plain = construct(ENCODER)  # the same class, with no data: no hook
    assert list(model.state_dict()) == list(plain.state_dict()) and type(model) is type(plain)
    packed = inputs.batch(3, random=True)
    packed[:, 0, 8:], packed[:, 1, 8:] = 0, 0  # padded sentences
    with torch.no_grad():
        assert torch.equal(model(packed), model(input_ids=packed[:, 0], attention_mask=packed[:, 1]))
        assert torch.equal(copy.deepcopy(model)(packed), model(packed))  # candidates are copies
    assert construct(ENCODER, inputs)._forward_pre_hooks and len(construct(ENCODER, inputs)._forward_pre_hooks) == 1
    assert count_macs(model, inputs) > 0


def test_exports_take_the_parts_by_name_and_match_the_network(tmp_path):
    import onnxruntime

    inputs = _splits().inputs
    model = construct(ENCODER, inputs).eval()
    packed = inputs.batch(3, random=True)
    packed[:, 1, 9:] = 0
    with torch.no_grad():
        expected = model(packed).numpy()
    onnx_file = export_model(model, tmp_path / "m.onnx", inputs)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    got = session.run(None, {"input_ids": packed[:, 0].numpy(), "attention_mask": packed[:, 1].numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert ort.feeds(inputs, packed).keys() == {"input_ids", "attention_mask"}
    traced = torch.jit.load(str(export_model(model, tmp_path / "m.pt", inputs)))
    np.testing.assert_allclose(traced(packed[:, 0], packed[:, 1]).detach().numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("masks", [True, False])
def test_int8_of_a_trained_encoder_keeps_its_accuracy_with_masks_or_ids_alone(masks):
    """Quantizing every activation of an attention network (masks of -inf, softmax) cost it a third of its
    score; its weighted operators alone keep it (workers.compression.quantize.WEIGHTED_OPS)."""
    from workers.compression.quantize import QuantizeConfig, accuracy, quantize_model

    splits = _splits(masks, train=768, val=128, test=256)
    torch.manual_seed(0)
    model = construct(ENCODER, splits.inputs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    x, y = splits.train
    for _ in range(4):  # epochs of batches of 64
        for index in torch.randperm(len(y)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    model.eval()
    quantized = quantize_model(model, splits, QuantizeConfig(calibration_batches=2, calibration_batch_size=64),
                               eval_threads=1, repeats=2)
    metrics = quantized.metrics
    fp32 = accuracy(ort.onnx_bytes(model, splits.inputs), splits.test, splits, threads=1)
    assert fp32 > 0.75  # it learnt the task
    assert abs(metrics.int8_accuracy - fp32) < 0.05 and metrics.int8_latency_ms > 0
    assert metrics.int8_model_bytes < metrics.fp32_onnx_bytes  # int8 weights


class Dicts(Dataset):
    """Examples whose input dicts are `make(index)`."""

    def __init__(self, make, n: int = 8) -> None:
        self.make, self.n = make, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.make(index), index % 2


def bad_dicts(kind: str) -> dict[str, Dataset]:
    ids = torch.arange(1, 9)
    makes = {
        "keys": lambda i: {"input_ids": ids, ("attention_mask" if i < 5 else "mask"): ids},
        "shapes": lambda i: {"input_ids": ids, "attention_mask": ids[:4]},
        "floats": lambda i: {"input_ids": ids, "attention_mask": ids.float()},
        "names": lambda i: {"input ids": ids},
    }
    return {"train": Dicts(makes[kind]), "test": Dicts(makes[kind])}


@pytest.mark.parametrize("kind,says", [
    ("keys", "example 5: the input's parts are ('input_ids', 'mask'), the data's first input's ('input_ids', "
             "'attention_mask')"),
    ("shapes", "a dict input's parts are integer tensors of one shape"),
    ("floats", "attention_mask torch.float32 (8,)"),
    ("names", "a dict input maps keyword argument names to tensors, got keys ['input ids']"),
])
def test_a_dict_that_cannot_be_packed_is_one_line(kind, says):
    config = DatasetConfig(name="python", factory="tests.test_keyword_inputs:bad_dicts", kwargs={"kind": kind},
                           in_memory=True)
    with pytest.raises(SearchsvcError, match="dataset.factory") as err:
        load_dataset(config)
    assert says in str(err.value)
