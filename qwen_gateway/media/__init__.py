"""Media for vision models: safe fetching, checking and decoding of a request's images and videos.

Build one :class:`MediaFetcher` per app from the settings (``MediaFetcher(settings.media)``) and close
it with ``await fetcher.aclose()`` when the app stops. Then, per content part::

    image = await fetcher.image(url)                  # FetchedImage(data, mime_type, width, height)
    video = await fetcher.video_frames(urls, fps)     # DecodedVideo: a frame list, each frame an image
    video = await fetcher.video_file(url, fps)        # DecodedVideo: PNG frames sampled at fps
    part = image.to_part(min_pixels=..., max_pixels=...)   # engines.base.ImagePart
    part = video.to_part()                                  # engines.base.VideoPart

and fetch all of one request's media concurrently with :func:`gather` (first failure cancels the rest
and is raised as is)::

    results = await gather(*(fetcher.image(u) for u in urls))

``url`` is ``http://``, ``https://`` or a base64 ``data:`` URL. ``fps`` None means DashScope's default
(2); outside [0.1, 10] is a 400 naming ``fps``. At most ``max_parallel_downloads`` downloads run at
once (server-wide). Decoding (and base64) runs in the fetcher's own small thread pool, never on the
event loop, and nothing is written to disk.

Every refusal is a :class:`qwen_gateway.errors.MediaError` (400, ``invalid_parameter_error``, a fixed
message per kind of problem, ``param`` None: callers that know the part's position may set
``err.param``). What is refused, and the ``[media]`` settings that bound it (clients can't raise them):

- URLs that are not http(s), carry userinfo, or whose host (in any spelling: decimal/hex/octal/short
  IPv4, IPv4-mapped IPv6, trailing dots, IDN) resolves to a loopback, private, link-local, CGNAT,
  metadata, multicast or otherwise special address, unless ``allow_hosts`` opens it; the check is
  repeated on every redirect hop and the connection goes to the address that was checked
  (``MediaURLRefused``);
- downloads that fail, answer non-2xx, redirect more than ``max_redirects`` times
  (``MediaDownloadFailed``) or take longer than ``fetch_timeout`` in all (``MediaDownloadTimeout``);
- bodies over ``max_image_bytes`` / ``max_video_bytes`` (a frame list's frames together too) and
  ``data:`` URLs over ``max_data_uri_bytes`` (checked before base64 decoding) (``MediaTooLarge``);
- bytes whose magic number is not a supported image / video container, whatever the declared type,
  or that do not decode (``MediaFormatInvalid``);
- images with a side of 10 px or less, or whose header declares more than ``max_image_pixels``
  (checked before decoding: decompression bombs) (``ImageSizeInvalid``);
- frame lists outside ``[min_video_frames, max_video_frames]``, video files longer than
  ``max_video_seconds`` or sampling to more than ``max_video_frames`` frames (``VideoLimitExceeded``).
"""

from qwen_gateway.media.fetcher import MediaFetcher, gather
from qwen_gateway.media.image import FetchedImage
from qwen_gateway.media.video import DEFAULT_FPS, DecodedVideo

__all__ = ["DEFAULT_FPS", "DecodedVideo", "FetchedImage", "MediaFetcher", "gather"]
