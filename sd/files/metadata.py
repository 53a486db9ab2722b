"""The settings text ("infotext", see sd/settings.py) stored in an image file, where A1111 and sd put it: a PNG's
`parameters` text chunk (tEXt, zTXt or iTXt), a JPEG's or WebP's EXIF UserComment.

Other tools' metadata is recognised so that the error can say what was found: ComfyUI's `prompt`/`workflow`
JSON, Fooocus's JSON `parameters`, InvokeAI's and NovelAI's chunks.
"""

from pathlib import Path

from PIL import Image

from ..errors import NoSettingsError, SDError

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
# the EXIF character codes that begin a UserComment; A1111 (through piexif) writes UNICODE as UTF-16 big-endian
COMMENT_CODES = {b"UNICODE\0": "utf-16", b"ASCII\0\0\0": "ascii", b"\0" * 8: "utf-8"}
OTHER_TOOLS = {
    "workflow": "a ComfyUI workflow", "prompt": "a ComfyUI workflow", "invokeai_metadata": "InvokeAI metadata",
    "sd-metadata": "InvokeAI metadata", "Dream": "InvokeAI metadata", "Comment": "NovelAI metadata",
}


def too_large(error: Image.DecompressionBombError) -> str:
    """Pillow's reason, without its guess at an attack: "Image size (400000000 pixels) exceeds limit of 178956970 pixels"."""
    return str(error).split(", could be")[0].rstrip(".")


def read_infotext_of(path: Path) -> str:
    """The image's settings text; NoSettingsError when it has none, SDError when it is no image or holds
    another tool's settings."""
    try:
        with Image.open(path) as image:
            texts = dict(getattr(image, "text", {}))  # a PNG's text chunks, read to the end of the file
            comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    except Image.DecompressionBombError as error:
        raise SDError(f"{path} is too large to read: {too_large(error)}") from None
    except (OSError, SyntaxError):  # UnidentifiedImageError is an OSError
        raise SDError(f"{path} is not an image this program can read: give a PNG, JPEG or WebP file") from None
    text = texts.get("parameters") or decode_comment(comment)
    if text and text.lstrip().startswith("{"):
        raise SDError(f"{path} holds its settings as JSON (as Fooocus writes them), not as A1111's text: sd cannot read them")
    if text:
        return text
    others = sorted({tool for key, tool in OTHER_TOOLS.items() if key in texts})
    if others:
        raise SDError(f"{path} holds {' and '.join(others)}, not A1111's settings text: sd reads only A1111-style settings")
    found = f" (its text chunks: {', '.join(texts)})" if texts else ""
    raise NoSettingsError(f"no settings found in {path}{found}: sd and A1111 write them in a PNG's parameters chunk or an EXIF UserComment")


def decode_comment(comment: bytes | str | None) -> str | None:
    """An EXIF UserComment's text: 8 bytes naming the character code, then the text."""
    if comment is None or isinstance(comment, str):
        return comment
    encoding = COMMENT_CODES.get(comment[:8], "utf-8")
    body = comment[8:] if comment[:8] in COMMENT_CODES else comment
    if encoding == "utf-16" and body[:2] not in (b"\xff\xfe", b"\xfe\xff"):
        # no byte-order mark: ASCII text shows which half of each pair is zero; big-endian when it does not
        encoding = "utf-16-le" if body[1:2] == b"\0" and body[:1] != b"\0" else "utf-16-be"
    return body.decode(encoding, errors="replace").rstrip("\0") or None
