import pytest

from lmforge.config import apply_values, describe, parse_overrides, read_config_file
from lmforge.errors import LmforgeError
from lmforge.inference.generate import SamplingConfig
from lmforge.training.pretrain import TrainConfig, train_config_from


def test_overrides_parse_nested_keys_and_flags():
    values = parse_overrides(["--model.n_layers=3", "--max_steps", "50", "--compile", "--learning-rate=3e-4"])
    assert values == {"model": {"n_layers": "3"}, "max_steps": "50", "compile": "true", "learning_rate": "3e-4"}


def test_preset_then_overrides_are_typed():
    config = train_config_from(
        parse_overrides(
            ["--preset=nanogpt-cpu", "--model.n_layers=3", "--max_steps=1e3", "--compile=false", "--peak_flops=1e11"]
        )
    )
    assert config.model.n_layers == 3 and config.model.d_model == 128  # the rest from the preset
    assert config.max_steps == 1000 and config.compile is False and config.peak_flops == 1e11


def test_unknown_key_suggests_the_closest():
    with pytest.raises(LmforgeError, match=r"unknown config key 'max_step' \(did you mean 'max_steps'\?\)"):
        train_config_from({"max_step": 5})
    with pytest.raises(LmforgeError, match=r"unknown config key model\.'n_layer'"):
        train_config_from({"model": {"n_layer": 5}})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"max_steps": "ten"}, "max_steps: expected an integer, got 'ten'"),
        ({"max_steps": 2.5}, "max_steps: expected an integer"),
        ({"learning_rate": "fast"}, "learning_rate: expected a number"),
        ({"compile": "maybe"}, "compile: expected true or false"),
        ({"model": 4}, "model: expected a mapping"),
        ({"model": {"norm": "batchnorm"}}, "model.norm='batchnorm'"),
        ({"preset": "gpt5"}, "unknown model preset 'gpt5'"),
    ],
)
def test_bad_values_are_clear_errors(values, message):
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        train_config_from(values)


def test_optional_and_list_fields():
    sampling = apply_values(SamplingConfig(), {"top_k": "none", "stop": "\n\n,END", "seed": "3"})
    assert sampling.top_k is None and sampling.stop == ["\n\n", "END"] and sampling.seed == 3


def test_model_list_and_mapping_fields_from_the_command_line():
    """layer_types as a comma list; rope_scaling as a JSON object or key by key (numbers read as numbers)."""
    values = parse_overrides(
        ["--preset=tiny", "--model.sliding_window=8", "--model.layer_types=sliding,full"]
        + ["--model.rope_scaling.rope_type=linear", "--model.rope_scaling.factor=4"]
    )
    model = train_config_from(values).model
    assert model.layer_types == ["sliding", "full"] and model.rope_scaling == {"rope_type": "linear", "factor": 4}
    whole = parse_overrides(["--preset=tiny", '--model.rope_scaling={"rope_type": "yarn", "factor": 2}'])
    assert train_config_from(whole).model.rope_scaling == {"rope_type": "yarn", "factor": 2}
    with pytest.raises(LmforgeError, match="model.rope_scaling: expected a mapping"):
        train_config_from(parse_overrides(["--preset=tiny", "--model.rope_scaling=linear"]))
    with pytest.raises(LmforgeError, match="expected a rope_type of"):
        train_config_from(parse_overrides(["--preset=tiny", "--model.rope_scaling.rope_type=longrope"]))
    with pytest.raises(LmforgeError, match="layer_types"):
        train_config_from(parse_overrides(["--preset=tiny", "--model.sliding_window=8", "--model.layer_types=full"]))


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "c.yaml").write_text("preset: tiny\nmax_steps: 7\nmodel:\n  n_layers: 1\n")
    config = train_config_from(read_config_file(tmp_path / "c.yaml"))
    assert (config.max_steps, config.model.n_layers, config.model.d_model) == (7, 1, 32)
    (tmp_path / "c.json").write_text('{"batch_size": 3}')
    assert train_config_from(read_config_file(tmp_path / "c.json")).batch_size == 3
    (tmp_path / "bad.yaml").write_text("a: [unclosed\n")
    with pytest.raises(LmforgeError, match="bad.yaml: cannot parse"):
        read_config_file(tmp_path / "bad.yaml")
    with pytest.raises(LmforgeError, match="not found"):
        read_config_file(tmp_path / "missing.yaml")


def test_default_train_config_is_the_quickstart_model():
    assert TrainConfig().model == train_config_from({}).model


def test_describe_reads_the_instance_nested_configs_included():
    rows = {key: default for key, _, default in describe(TrainConfig())}
    assert rows["model.norm"] == "'rmsnorm'" and rows["model.d_model"] == "192"  # the quickstart preset's
    rows = {key: default for key, _, default in describe(train_config_from({"preset": "nanogpt-cpu"}))}
    assert rows["preset"] == "'nanogpt-cpu'" and rows["model.norm"] == "'layernorm'"


def test_sampling_values_out_of_range_are_errors_naming_each_field():
    from lmforge.config import apply_values
    from lmforge.settings import SamplingConfig

    with pytest.raises(LmforgeError) as error:
        apply_values(SamplingConfig(), {"top_p": "2", "top_k": "0", "repetition_penalty": "0"})
    assert str(error.value) == (
        "top_k must be >= 1 or unset, got 0; top_p must be in (0, 1] or unset, got 2.0; "
        "repetition_penalty must be > 0 (1 is none), got 0.0"
    )
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingConfig(temperature=-1)
    assert SamplingConfig(max_new_tokens=0, temperature=0, top_k=1, top_p=1.0).top_p == 1.0  # the edges are fine


def test_a_typed_mapping_field_from_the_command_line_and_a_file():
    """sampling.logit_bias is dict[int, float]: JSON's string keys become token ids, values numbers."""
    overrides = parse_overrides(['--logit_bias={"12": -100, "7": 2.5}'])
    assert apply_values(SamplingConfig(), overrides).logit_bias == {12: -100.0, 7: 2.5}
    assert apply_values(SamplingConfig(), {"logit_bias": {"3": 1}}).logit_bias == {3: 1.0}
    with pytest.raises(LmforgeError, match="logit_bias: expected an integer"):
        apply_values(SamplingConfig(), {"logit_bias": {"the": 1}})
