"""The chat templates a mergekit config may name (``chat_template: chatml``): taskarith's own Jinja text for
each name mergekit 0.1.5 ships, written to render every conversation exactly as mergekit's template of that
name does under Transformers' renderer (whitespace included; tested against mergekit's files).
"""

from __future__ import annotations

__all__ = ["NAMED"]

_CHATML = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_LLAMA3 = (
    "{%- for m in messages -%}"
    "{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

_MISTRAL = (
    "{%- set turns = messages -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('roles must alternate user, assistant, user, ... after an optional system message') -}}"
    "{%- elif m['role'] == 'user' -%}"
    "{%- if loop.first and system is defined -%}"
    "{{- ' [INST] ' + system + '\\n\\n' + m['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- ' [INST] ' + m['content'] + ' [/INST]' -}}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}{{- ' ' + m['content'] + eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('only user and assistant turns, after an optional system message, are supported') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_ALPACA = (
    "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
    "{%- if systems -%}{{- (systems | last).content | trim -}}{%- endif -%}"
    "{{- '\\n\\n' -}}"
    "{%- set heads = {'user': '### Instruction:\\n', 'assistant': '### Response:\\n', "
    "'user_context': '### Input:\\n'} -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] in heads -%}"
    "{{- heads[m['role']] + m['content'] | trim -}}"
    "{%- if not loop.last -%}{{- '\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{- '### Response:\\n' -}}{%- endif -%}"
)

_EXAONE = (
    "{%- for m in messages -%}"
    "{%- if loop.first and m['role'] != 'system' -%}{{- '        [|system|][|endofturn|]\\n\\n' -}}{%- endif -%}"
    "{{- '    [|' + m['role'] + '|]' + m['content'] + '\\n        ' -}}"
    "{{- ('\\n' if m['role'] == 'user' else '[|endofturn|]\\n') + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '    [|assistant|]\\n' -}}{%- endif -%}"
)

NAMED = {"alpaca": _ALPACA, "chatml": _CHATML, "exaone": _EXAONE, "llama3": _LLAMA3, "mistral": _MISTRAL}
