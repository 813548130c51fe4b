"""Built-in OmegaConf recipes (YAML files in ``var/`` and ``tokenizer/``)."""
