"""omni-vllm: serve Qwen2.5-Omni with vLLM and let it talk.

Importing this package does not import vLLM; vLLM finds the plugin through the
`vllm.general_plugins` entry point (`omni_vllm.plugin:register`).
"""

__version__ = "0.1.0"
