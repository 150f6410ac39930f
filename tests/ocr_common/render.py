# Renders a synthetic 8-bit ultrasound frame for the OCR tests and benchmark: a fan-shaped sector
# of blurred speckle on black, and optional lines of text drawn with a DejaVu font (Debian's
# fonts-dejavu-core) through Pillow (python3-pil).
# Usage: render.py WIDTH HEIGHT SEED [X,Y,SIZE,TEXT]...
# Writes the raw pixels (row by row, one byte each) to stdout and "x0 y0 x1 y1" of the text
# (the union of every line's box, or "none") to stderr.
import random
import sys

from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"

w, h, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
speckle = Image.frombytes("L", (w, h), rng.randbytes(w * h))
speckle = speckle.filter(ImageFilter.GaussianBlur(1.2)).point(lambda v: 10 + (v * 150) // 255)
mask = Image.new("L", (w, h), 0)
cx, top = w // 2, h // 6
ImageDraw.Draw(mask).pieslice(
    [cx - int(h * 0.8), top - int(h * 0.8), cx + int(h * 0.8), top + int(h * 0.8)], 55, 125, fill=255
)
img = Image.new("L", (w, h), 0)
img.paste(speckle, (0, 0), mask)
draw = ImageDraw.Draw(img)
box = None
for spec in sys.argv[4:]:
    x, y, size, text = spec.split(",", 3)
    font = ImageFont.truetype(FONT, int(size))
    draw.text((int(x), int(y)), text, fill=235, font=font)
    b = draw.textbbox((int(x), int(y)), text, font=font)
    box = b if box is None else (min(box[0], b[0]), min(box[1], b[1]), max(box[2], b[2]), max(box[3], b[3]))
sys.stdout.buffer.write(img.tobytes())
sys.stderr.write("none" if box is None else "%d %d %d %d" % box)
