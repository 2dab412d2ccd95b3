"""The gateway's one exception tree.

Every layer raises these; the API layer renders them (``api/errors.py``) in the wire shape of the
protocol that is answering. Nothing else decides an HTTP status.

    GatewayError                      anything the gateway itself raises on purpose
    ├── StartupError                  configuration or a checkpoint that can't be loaded (CLI: one line)
    └── ApiError                      an answer to a client: status, code, type, message, param
        ├── InvalidParameter          400 invalid_parameter_error (names the ``param``)
        │   ├── ContextLengthExceeded 400 the prompt (plus max_tokens) does not fit the model
        │   └── MediaError            400 an image/video part can't be used (media/); one fixed message
        │       ├── MediaURLRefused       the URL is not http(s) or targets a non-public address
        │       ├── MediaDownloadFailed   connection failed, non-2xx answer, too many redirects
        │       ├── MediaDownloadTimeout  the download took longer than the server allows
        │       ├── MediaTooLarge         a data: URL or a download over its byte cap
        │       ├── MediaFormatInvalid    the bytes are not an image/video we read (magic bytes, decoder)
        │       ├── ImageSizeInvalid      an image side <= 10 px, or more pixels than the cap (bombs)
        │       └── VideoLimitExceeded    frame count or duration outside the server's caps
        │   ├── MissingField          400 a native request without model / input (BadRequest.Empty*)
        │   └── FileError             400 an uploaded file, or a fileid:// reference, can't be used
        │       (FileInvalid, FileTooLarge, FileBlank, FilePageLimit, FileQuotaExceeded, FileNotReady,
        │        FileReferenceNotFound, TooManyFiles, FilesExceedContext: DashScope's texts)
        ├── InvalidRequest            400 malformed body / unsupported request (``invalid_request_error``)
        ├── PayloadTooLarge           400 the body is over the server's limit (DashScope: 400 TooLarge)
        ├── Arrearage                 400 the key's balance can't cover the request's hold
        ├── AuthenticationError       401 invalid_api_key
        ├── AdminAccessDenied         403 AccessDenied (an API key on the admin API)
        ├── ModelNotFound             404 model_not_found
        ├── ResourceNotFound          404 NotFound (an admin API object, e.g. a key, that doesn't exist)
        │   ├── FileNotFound          404 a file id the key doesn't own (or that doesn't exist)
        │   └── BatchNotFound         404 a batch id the key doesn't own (or that doesn't exist)
        ├── RateLimited               429 limit_requests (the key's requests per minute)
        ├── QuotaExceeded             429 insufficient_quota (the key's tokens per minute)
        ├── EngineOverloaded          503 the engine can't take more work now
        ├── EngineUnavailable         503 the model is not loaded / failed
        ├── ShuttingDown              503 the server stopped before the request finished
        └── EngineFailure             500 the engine broke while generating

Each class states its compatible-mode ``code``/``type`` and its native DashScope ``native_code`` so the
two protocols can render the same failure.
"""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    """Base of every error the gateway raises deliberately."""


class StartupError(GatewayError):
    """The server cannot start; ``str(err)`` is a one-line message for the terminal."""


class ApiError(GatewayError):
    """An error answered to a client."""

    status: int = 500
    code: str | None = "internal_error"
    type: str = "internal_error"
    native_code: str = "InternalError"
    default_message: str = "An internal error has occured, please try again later."
    # DashScope adds the request id to most error bodies, but not to the bad-key one (seed 000).
    include_request_id: bool = True

    def __init__(
        self, message: str | None = None, *, param: str | None = None, retry_after: int | None = None
    ) -> None:
        self.message = message if message is not None else self.default_message
        self.param = param
        # Seconds a client should wait before trying again (sent as ``Retry-After``), when known.
        self.retry_after = retry_after
        super().__init__(self.message)

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers this error adds to its answer."""
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class InvalidParameter(ApiError):
    status = 400
    code = "invalid_parameter_error"
    type = "invalid_request_error"
    native_code = "InvalidParameter"
    default_message = "The request parameters are invalid."


class ContextLengthExceeded(InvalidParameter):
    @classmethod
    def input_range(cls, max_context: int) -> ContextLengthExceeded:
        """DashScope's refusal of a prompt of ``max_context`` tokens or more (reference §5.1)."""
        return cls(f"Range of input length should be [1, {max_context - 1}]", param="messages")


class MediaError(InvalidParameter):
    """An image or video part was refused by ``media/``. Every subclass has a fixed message (DashScope's
    where it is known) that never carries decoder text, a resolved address or the URL."""

    # DashScope's algorithm-layer prefix on media errors (reference §5.1; issue threads quoting them).
    PREFIX = "<400> InternalError.Algo.InvalidParameter: "


class MediaURLRefused(MediaError):
    # Ours: DashScope fetches from the public internet only and has no message for this case.
    default_message = MediaError.PREFIX + "The provided URL is not allowed."


class MediaDownloadFailed(MediaError):
    # DashScope's text for an unreachable/failed media URL (compat mode, quoted in litellm#6307).
    default_message = MediaError.PREFIX + "Failed to download multimodal content"


class MediaDownloadTimeout(MediaError):
    # DashScope's text when the media download times out (quoted in FastGPT#4393).
    default_message = MediaError.PREFIX + "Download multimodal file timed out"


class MediaTooLarge(MediaError):
    def __init__(self, limit: int, *, data_uri: bool) -> None:
        if data_uri:  # DashScope's text, reference §3.3
            message = f"Exceeded limit on max bytes per data-uri item : {limit}"
        else:
            message = MediaError.PREFIX + f"The multimodal file exceeds the size limit of {limit} bytes."
        super().__init__(message)


class MediaFormatInvalid(MediaError):
    def __init__(self, kind: str = "image") -> None:
        super().__init__(MediaError.PREFIX + f"The {kind} format is illegal and cannot be opened.")


class ImageSizeInvalid(MediaError):
    @classmethod
    def too_small(cls, width: int, height: int) -> ImageSizeInvalid:
        # DashScope's text (reference §3.3): each side must be larger than 10 px.
        return cls(
            MediaError.PREFIX + "The image length and width do not meet the model restrictions. "
            f"[height:{height} or width:{width} must be larger than 10]"
        )

    @classmethod
    def too_many_pixels(cls, limit: int) -> ImageSizeInvalid:
        return cls(
            MediaError.PREFIX + "The image length and width do not meet the model restrictions. "
            f"[height*width must not exceed {limit}]"
        )


class VideoLimitExceeded(MediaError):
    @classmethod
    def frame_count(cls, low: int, high: int) -> VideoLimitExceeded:
        # DashScope's text for a frame-list video of the wrong length, typo included (reference §3.3).
        return cls(MediaError.PREFIX + f"The range of sequence images shoule be ({low}, {high}).")

    @classmethod
    def duration(cls, limit: float) -> VideoLimitExceeded:
        return cls(MediaError.PREFIX + f"The video is longer than {limit:g} seconds.")

    @classmethod
    def sampled_frames(cls, limit: int) -> VideoLimitExceeded:
        return cls(
            MediaError.PREFIX + f"The video sampled at the requested fps has more than {limit} frames."
        )


class MissingField(InvalidParameter):
    """A native request lacks ``model`` or ``input``: DashScope's ``BadRequest.EmptyModel`` /
    ``BadRequest.EmptyInput`` (reference §1.5, §5.2)."""

    def __init__(self, message: str, *, param: str, native_code: str) -> None:
        super().__init__(message, param=param)
        self.native_code = native_code


class InvalidRequest(ApiError):
    """The body is not a request at all (bad JSON, wrong top-level type)."""

    status = 400
    code = "invalid_request_error"
    type = "invalid_request_error"
    native_code = "BadRequest.IllegalInput"  # reference §5.2
    default_message = "The input parameter requires json format."


class PayloadTooLarge(ApiError):
    status = 400
    code = "BadRequest.TooLarge"
    type = "invalid_request_error"
    native_code = "BadRequest.TooLarge"
    default_message = "Payload Too Large."


class AuthenticationError(ApiError):
    status = 401
    code = "invalid_api_key"
    type = "invalid_request_error"
    native_code = "InvalidApiKey"
    # DashScope's compatible-mode message, trailing space included (seed 000).
    default_message = "Incorrect API key provided. "
    include_request_id = False


class AdminAccessDenied(ApiError):
    """A valid API key used on the admin API, which only admin keys open (reference §5: 403)."""

    status = 403
    code = "AccessDenied"
    type = "AccessDenied"
    native_code = "AccessDenied"
    default_message = "Access denied."


class ResourceNotFound(ApiError):
    status = 404
    code = "NotFound"
    type = "invalid_request_error"
    native_code = "NotFound"
    default_message = "Not found."


class ModelNotFound(ApiError):
    status = 404
    code = "model_not_found"
    type = "invalid_request_error"
    native_code = "ModelNotFound"

    # Longest model id echoed back whole; a longer one (up to the body limit) is cut, so an error
    # body never grows with the request.
    ECHO_LIMIT = 128

    def __init__(self, model: str) -> None:
        shown = model if len(model) <= self.ECHO_LIMIT else model[: self.ECHO_LIMIT] + "..."
        super().__init__(
            f"The model `{shown}` does not exist or you do not have access to it.", param="model"
        )


class Arrearage(ApiError):
    """DashScope's overdue-payment refusal (reference §5.1: HTTP 400, code and type ``Arrearage``)."""

    status = 400
    code = "Arrearage"
    type = "Arrearage"
    native_code = "Arrearage"
    default_message = (
        "Access denied, please make sure your account is in good standing. "
        "For details, see: https://help.aliyun.com/zh/model-studio/error-code#overdue-payment"
    )


class RateLimited(ApiError):
    status = 429
    code = "limit_requests"
    type = "limit_requests"
    native_code = "Throttling.RateQuota"
    # reference §5.1, the compatible-mode text with its link.
    default_message = (
        "You have exceeded your current request limit. "
        "For details, see: https://help.aliyun.com/zh/model-studio/error-code#rate-limit"
    )


class QuotaExceeded(ApiError):
    """DashScope's TPM throttle (``Throttling.AllocationQuota`` dressed as ``insufficient_quota``)."""

    status = 429
    code = "insufficient_quota"
    type = "insufficient_quota"
    native_code = "Throttling.AllocationQuota"
    default_message = (
        "You exceeded your current quota, please check your plan and billing details. "
        "For details, see: https://help.aliyun.com/zh/model-studio/error-code#token-limit"
    )


class EngineOverloaded(ApiError):
    status = 503
    code = "ModelServingError"
    type = "ModelServingError"
    native_code = "ModelServingError"
    # reference §5.2: DashScope's 503 when a model is past its serving capacity.
    default_message = (
        "Too many requests. Your requests exceed the system capacity limits, please try again later."
    )


class EngineUnavailable(ApiError):
    status = 503
    code = "ModelUnavailable"
    type = "ModelUnavailable"
    native_code = "ModelUnavailable"
    default_message = "Model is unavailable, please try again later."


class ShuttingDown(ApiError):
    """The server's shutdown grace period ended before this request did."""

    status = 503
    code = "ServiceUnavailable"
    type = "ServiceUnavailable"
    native_code = "ServiceUnavailable"
    default_message = "The server is shutting down; the request was stopped before it finished."


class EngineFailure(ApiError):
    status = 500
    code = "internal_error"
    type = "internal_error"
    native_code = "InternalError.Algo"
    default_message = "inference internal error."


class FileError(InvalidParameter):
    """An upload refused, or a ``fileid://`` reference that can't be used. Messages are DashScope's
    (reference §1.3, Qwen-Long errors), with the file's id; the reason after them is fixed text, never
    a parser's message."""

    def __init__(self, message: str, *, param: str | None = "file") -> None:
        super().__init__(message, param=param)


class FileInvalid(FileError):
    # Why, in our words, after DashScope's sentence (reason codes of qwen_gateway/documents).
    REASONS: ClassVar[dict[str, str]] = {
        "unsupported": "The file is not a document this server reads (txt, md, pdf, docx, xlsx, pptx, "
        "html, epub).",
        "encrypted": "The file is encrypted or password-protected.",
        "bomb": "The file unpacks to more than the server allows.",
        "nested_archive": "The file holds an archive inside it.",
        "too_much_text": "The file holds more text than the server allows.",
        "corrupt": "The file is damaged or malformed.",
        "limits": "Reading the file took more time or memory than the server allows.",
        "not_jsonl": "A batch file must be UTF-8 JSONL: one JSON object per line.",
        "storage": "The server could not store the file (no space left).",
    }

    def __init__(self, file_id: str, reason: str) -> None:
        detail = self.REASONS.get(reason, self.REASONS["corrupt"])
        super().__init__(f"Invalid file [id:{file_id}]. {detail}")
        self.reason = reason


class FileTooLarge(FileError):
    def __init__(self, file_id: str, limit: int) -> None:
        super().__init__(f"File [id:{file_id}] exceeds size limit. (at most {limit} bytes)")


class FileBlank(FileError):
    def __init__(self, file_id: str) -> None:
        super().__init__(f"File [id:{file_id}] content blank.")


class FilePageLimit(FileError):
    def __init__(self, file_id: str, limit: int) -> None:
        super().__init__(f"File [id:{file_id}] exceeds page limits ({limit} pages).")


class FileQuotaExceeded(FileError):
    # DashScope's native upload answers a full quota with BadRequest.TooMany (reference captures).
    code = "BadRequest.TooMany"
    native_code = "BadRequest.TooMany"

    @classmethod
    def files(cls, limit: int) -> FileQuotaExceeded:
        return cls(f"Out of number, <{limit}> of <{limit}> files has been uploaded.")

    @classmethod
    def bytes(cls, limit: int) -> FileQuotaExceeded:
        return cls(f"Out of storage, the files of this key may hold at most {limit} bytes.")


class FileNotReady(FileError):
    def __init__(self, param: str) -> None:
        super().__init__("File parsing in progress, please try again later.", param=param)


class FileReferenceNotFound(FileError):
    def __init__(self, file_id: str, param: str) -> None:
        super().__init__(f"File [id:{_shown_id(file_id)}] cannot be found.", param=param)


class TooManyFiles(FileError):
    def __init__(self, param: str) -> None:
        super().__init__("Too many files provided.", param=param)


class FilesExceedContext(FileError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"Total message token length exceed model limit ({limit} tokens).", param="messages")


class FileNotFound(ResourceNotFound):
    def __init__(self, file_id: str) -> None:
        super().__init__(f"File [id:{_shown_id(file_id)}] cannot be found.", param="file_id")


def _shown_id(file_id: str) -> str:
    # A client-sent id is echoed, but never at any length.
    return file_id if len(file_id) <= 128 else file_id[:128] + "..."


class BatchNotFound(ResourceNotFound):
    def __init__(self, batch_id: str) -> None:
        super().__init__(f"Batch [id:{_shown_id(batch_id)}] cannot be found.", param="batch_id")


class BatchLineNotRun(InvalidRequest):
    """A batch line that never ran: its batch was cancelled or its completion window ended first (what
    its error-file line says)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
