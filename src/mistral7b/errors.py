"""Exceptions a user can act on. The CLI prints their message as one line and exits non-zero."""


class Mistral7BError(Exception):
    """Base class for every error mistral7b raises on purpose."""


class ModelFileError(Mistral7BError):
    """A weight/config file is missing, truncated, corrupt or does not fit the config.

    The message always names the file and what is wrong with it.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class TokenizerError(Mistral7BError):
    """A tokenizer file is missing or unusable, or a chat conversation is malformed."""


class InputError(Mistral7BError):
    """A request the model cannot serve: empty or over-long prompt, bad sampling value, ...

    `param` names the argument at fault when there is one ("top_p", "stop", "messages"), so
    the server reports it in OpenAI's `error.param` without parsing the message.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
