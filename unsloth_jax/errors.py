"""Errors raised on bad input. Each message names the file/line/field and the fix."""


class UnslothJaxError(Exception):
    """Base class for every error this library raises on bad user input."""


class CheckpointError(UnslothJaxError):
    """A model directory, safetensors file or tensor is missing, corrupt or the wrong shape."""


class UnsupportedModelError(UnslothJaxError):
    """The checkpoint's architecture or one of its options is not supported."""


class ConfigError(UnslothJaxError):
    """A training/LoRA config key or value is invalid."""


class DataError(UnslothJaxError):
    """A dataset file, example or chat template cannot be turned into training data."""


class AdapterError(UnslothJaxError):
    """A PEFT adapter does not fit the base model."""
