"""`jaxllm.text`: BOS once where the model expects it, chat templates as transformers renders them, end ids."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jaxllm.errors import InputError
from jaxllm.text import load_codec

SPECIALS = ["<s>", "</s>", "<|eot|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def write_checkpoint_files(path, *, post_processor_bos: bool, add_bos_token: bool, template: str | None = TEMPLATE):
    """A small Llama-like tokenizer directory as transformers saves one (tokenizer.json + configs)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["hello world, the cat sat on the mat"] * 20, trainer)
    if post_processor_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "add_bos_token": add_bos_token, **({"chat_template": template} if template else {})}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 2]}))
    return path


@pytest.mark.parametrize(("post_processor_bos", "add_bos_token"), [(True, True), (False, True), (False, False)])
def test_plain_prompts_get_bos_exactly_once_where_the_model_expects_it(tmp_path, post_processor_bos, add_bos_token):
    d = write_checkpoint_files(tmp_path, post_processor_bos=post_processor_bos, add_bos_token=add_bos_token)
    codec = load_codec(d, 300)
    ids = codec.encode("hello world")
    expects_bos = post_processor_bos or add_bos_token
    assert ids.count(0) == (1 if expects_bos else 0)
    assert (ids[0] == 0) == expects_bos
    if post_processor_bos or not add_bos_token:  # else transformers 5's generic class ignores add_bos_token
        transformers = pytest.importorskip("transformers")
        hf = transformers.AutoTokenizer.from_pretrained(d)
        for text in ("hello world", "the cat sat", "<s>hello"):  # a literal BOS in plain text: as transformers does
            assert codec.encode(text) == hf(text)["input_ids"], text


def test_chat_template_with_bos_matches_transformers_and_adds_no_second_bos(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = write_checkpoint_files(tmp_path, post_processor_bos=True, add_bos_token=True)
    codec = load_codec(d, 300)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    hf = transformers.AutoTokenizer.from_pretrained(d)
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    got = codec.encode_chat(messages)
    assert got == want
    assert got.count(0) == 1 and got[0] == 0
    assert codec.render_chat(messages) == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_end_ids_are_the_generation_configs_and_the_eos(tmp_path):
    d = write_checkpoint_files(tmp_path, post_processor_bos=False, add_bos_token=False)
    assert load_codec(d, 300).end_ids == [1, 2]


def test_a_template_that_raises_and_a_missing_template_are_clear_input_errors(tmp_path):
    bad = "{{ raise_exception('only user messages, please') }}"
    d = write_checkpoint_files(tmp_path / "a", post_processor_bos=False, add_bos_token=False, template=bad)
    with pytest.raises(InputError, match="only user messages"):
        load_codec(d, 300).encode_chat([{"role": "user", "content": "x"}])
    d = write_checkpoint_files(tmp_path / "b", post_processor_bos=False, add_bos_token=False, template=None)
    with pytest.raises(InputError, match="no chat template"):
        load_codec(d, 300).encode_chat([{"role": "user", "content": "x"}])


def test_the_sandbox_refuses_python_internals(tmp_path):
    escape = "{{ messages.__class__.__mro__ }}"
    d = write_checkpoint_files(tmp_path, post_processor_bos=False, add_bos_token=False, template=escape)
    with pytest.raises(InputError, match=r"unsafe"):
        load_codec(d, 300).encode_chat([{"role": "user", "content": "x"}])
