"""What a model folder carries for engines other than ours (vLLM, plain transformers): written by `convert`,
`create-tiny-model`, and `convert --upgrade FOLDER` for folders made before.

- `architectures`: the skingpt4 plugin's class for vLLM (`backends/vllm_plugin.py`). transformers does not read it
  (our loader and `AutoModelForImageTextToText` go by `model_type`, blip-2); a vLLM without the plugin refuses the
  folder ("not supported") instead of serving it with the photos' slots at the prompt's start.
- `text_config.architectures`: vLLM builds BLIP-2's language model from the text config through its registry,
  which refuses a config without architectures ("No model architectures are specified").
- `preprocessor_config.json` and `processor_config.json`: `AutoProcessor.from_pretrained(folder)` gives a
  `Blip2Processor` (vLLM requires one) whose image processor is our eval transform (`inputs/pixels.py`): a 224 x 224
  bicubic resize that squashes, CLIP mean and std, RGB. With Pillow (transformers' backend when torchvision is not
  installed) its pixels equal ours (tests/test_serving_files.py). Where torchvision is installed (vLLM's
  environment) transformers picks its torchvision backend, whose resize differs (up to 0.015 after normalisation,
  transformers 5.20), and a folder cannot choose the backend: the vLLM plugin computes pixels with `inputs/pixels.py`.
- `chat_template.jinja`: the folder's prompt template with one `<image>` per photo, laid out as `Conversation`
  does (each photo a user message `<Img><image></Img>`; the question after it joins that message with a space).
  The original tokenizes the prompt segment by segment, split at each image, so SentencePiece puts its word-start
  mark on the first word of every segment; tokenized whole, the text after `<s>` and after each `<image>` would
  lack it. The template therefore writes a space there (`<s> Give`, `<image> </Img>`): tokenized whole with
  `add_special_tokens=False`, and each `<image>` expanded to the 32 query slots in place, its ids are our prompt
  ids (tested for 1-3 photos and 1-4 turns with a SentencePiece tokenizer, as Llama-2's and Vicuna's are). The
  template loops over a variable named `content`: that is how `vllm serve` recognises a template that takes the
  messages' parts (its "openai" content format); otherwise it flattens each message to text with the image
  placeholders first, and the prompt is not the original's (folders from before: `convert --upgrade FOLDER`).
"""

from __future__ import annotations

import json
from pathlib import Path

from skingpt4.folder.meta import IMAGE_TOKEN, NUM_QUERY_TOKENS, ModelMeta
from skingpt4.inputs.conversation import IMAGE_MESSAGE, IMAGE_PLACEHOLDER, Template, get_template

ARCHITECTURE = "SkinGPT4ForConditionalGeneration"  # vLLM's BLIP-2 as SkinGPT-4 needs it (`backends/vllm_model.py`)
TEXT_ARCHITECTURE = "LlamaForCausalLM"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def write_serving_files(folder: Path) -> list[str]:
    """Add (or refresh) the files above in a model folder; returns the names written. Weights are not touched."""
    folder = Path(folder)
    meta = ModelMeta.load(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["architectures"] = [ARCHITECTURE]
    config.setdefault("text_config", {})["architectures"] = [TEXT_ARCHITECTURE]
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    image_processor(meta).save_pretrained(folder)
    processor = {"processor_class": "Blip2Processor", "num_query_tokens": config.get("num_query_tokens", 32)}
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")
    (folder / CHAT_TEMPLATE_FILE).write_text(chat_template(get_template(meta.template)), encoding="utf-8")
    return ["config.json", "preprocessor_config.json", "processor_config.json", CHAT_TEMPLATE_FILE]


def image_processor(meta: ModelMeta):
    """transformers' BLIP image processor set to our eval transform (its Pillow backend where transformers has
    one by name: the plain class would say, on every save, that torchvision is missing and it falls back to it)."""
    try:
        from transformers import BlipImageProcessorPil as Processor
    except ImportError:  # older transformers: the plain class is the Pillow one
        from transformers import BlipImageProcessor as Processor

    return Processor(
        size={"height": meta.image_size, "width": meta.image_size},
        resample=3,  # PIL.Image.BICUBIC
        image_mean=list(meta.image_mean),
        image_std=list(meta.image_std),
        do_convert_rgb=True,
    )


def chat_template(template: Template) -> str:
    """A Jinja chat template that renders OpenAI-style messages as `template` renders a `Conversation`."""
    image = json.dumps(IMAGE_MESSAGE.replace(IMAGE_PLACEHOLDER, IMAGE_TOKEN + " "))
    user, assistant, sep = (json.dumps(s) for s in (*template.roles, template.sep))
    closing = json.dumps(IMAGE_MESSAGE[IMAGE_MESSAGE.index(IMAGE_PLACEHOLDER) + len(IMAGE_PLACEHOLDER) :])
    return f"""{{#- skingpt4: the {template.name} template; {NUM_QUERY_TOKENS} query slots per <image> -#}}
{{%- set ns = namespace(user=none) -%}}
{{{{- bos_token + {json.dumps(" " + template.system + template.sep)} -}}}}
{{%- for message in messages -%}}
  {{%- set content = message['content'] if message['content'] is not string
      else [{{'type': 'text', 'text': message['content']}}] -%}}
  {{%- if message['role'] == 'user' -%}}
    {{%- for part in content -%}}
      {{%- if part['type'] in ['image', 'image_url'] -%}}
        {{%- if ns.user is not none -%}}{{{{- {user} + ns.user + {sep} -}}}}{{%- endif -%}}
        {{%- set ns.user = {image} -%}}
      {{%- elif part['type'] == 'text' -%}}
        {{%- if ns.user is not none and ns.user.endswith({closing}) -%}}
          {{%- set ns.user = ns.user + ' ' + part['text'] -%}}
        {{%- else -%}}
          {{%- if ns.user is not none -%}}{{{{- {user} + ns.user + {sep} -}}}}{{%- endif -%}}
          {{%- set ns.user = part['text'] -%}}
        {{%- endif -%}}
      {{%- endif -%}}
    {{%- endfor -%}}
  {{%- elif message['role'] == 'assistant' -%}}
    {{%- if ns.user is not none -%}}{{{{- {user} + ns.user + {sep} -}}}}{{%- set ns.user = none -%}}{{%- endif -%}}
    {{{{- {assistant} + content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')
        + {sep} -}}}}
  {{%- endif -%}}
{{%- endfor -%}}
{{%- if ns.user is not none -%}}{{{{- {user} + ns.user + {sep} -}}}}{{%- endif -%}}
{{%- if add_generation_prompt -%}}{{{{- {json.dumps(template.open_role)} -}}}}{{%- endif -%}}
"""
