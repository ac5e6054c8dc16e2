"""Synthetic scenes of coloured shapes with verifiable questions (recipe kind `synthetic_scenes`).

A scene is 1..n shapes (circle / square / triangle x red / green / blue / yellow) on a white
canvas. Each sample asks one question whose answer is unambiguous for its scene, and carries the
privileged text the paper found most useful for VLMs: every object's label and bounding box (or,
as a weaker variant, a short caption). With `modality: text` there is no image and the question
carries only a partial description, so the privileged text stays genuinely privileged for a
text-only model.

Everything is a pure function of (seed, split, index): sample i of a split is the same whatever
`limit` is, the same across model families (only the box coordinates' format changes), and the
same across modalities (the scene is drawn before the partial description).
"""

from __future__ import annotations

import hashlib
import random
import typing
from dataclasses import dataclass, field
from typing import Annotated, Callable, Literal

import datasets
from PIL import Image, ImageDraw

from dopd_vlm.data.answers import WHOLE_RESPONSE, AnswerExtractor
from dopd_vlm.data.dataset import sample_features
from dopd_vlm.data.images import png_bytes
from dopd_vlm.data.schema import RecipeError
from dopd_vlm.families import family_info
from dopd_vlm.validation import INTERNAL, AtLeast, IntRange, NonEmpty

SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLORS = {
    "red": (220, 50, 50),
    "green": (40, 160, 70),
    "blue": (50, 90, 220),
    "yellow": (240, 200, 40),
}
BACKGROUND = (255, 255, 255)
QuestionType = Literal[
    "count", "count_color", "count_shape", "color_of_shape", "shape_of_color", "leftmost", "rightmost",
    "largest", "left_of",
]
QUESTION_TYPES = typing.get_args(QuestionType)
Split = Literal["train", "test", "ood"]
MAX_OBJECTS = 8
GAP = 4  # px between any two objects, so every shape is fully visible and separable
MARGIN = 6  # px by which a spatial comparison must win to be asked about
LARGEST_RATIO = 1.5  # so the largest box also has the most pixels, whatever the shapes
TEST_BUCKETS = 8  # one bucket of the scene+question hash belongs to test, the rest to train
MAX_TRIES = 2000


@dataclass(frozen=True)
class SyntheticScenesRecipe:
    """Keys of a `kind: synthetic_scenes` recipe (see data_recipes/README.md)."""

    description: str = ""
    modality: Literal["image", "text"] = "image"
    privileged: Literal["boxes", "caption"] = "boxes"
    image_size: Annotated[int, AtLeast(32)] = 112
    seed: int = 0
    splits: Annotated[dict[Split, Annotated[int, AtLeast(0)]], NonEmpty()] = field(
        default_factory=lambda: {"train": 2000, "test": 200, "ood": 200}
    )
    objects: Annotated[dict[Split, Annotated[tuple[int, int], IntRange(1, MAX_OBJECTS)]], NonEmpty()] = field(
        default_factory=lambda: {"train": (1, 4), "ood": (5, 6)}
    )
    object_size: Annotated[tuple[int, int], IntRange(4)] = (16, 34)
    question_types: Annotated[tuple[QuestionType, ...], NonEmpty()] = QUESTION_TYPES
    answer_extractor: AnswerExtractor = WHOLE_RESPONSE
    answer_instruction: str = ""  # appended to every question on a new line (e.g. the answer format)
    source: str = field(default="<recipe>", metadata=INTERNAL)

    def __post_init__(self) -> None:
        if self.object_size[1] > self.image_size // 2:
            raise RecipeError(
                f"recipe {self.source}: key 'object_size': must be at most image_size / 2 "
                f"= {self.image_size // 2}, got {list(self.object_size)}"
            )
        for split in self.splits:
            if split not in self.objects and not (split == "test" and "train" in self.objects):
                raise RecipeError(
                    f"recipe {self.source}: key 'objects': has no range for split '{split}'"
                )

    def field_label(self, name: str) -> str:
        """A canonical field as messages name it."""
        return f"'{name}'"

    def object_range(self, split: str) -> tuple[int, int]:
        """Object counts of a split; `test` shares `train`'s unless given."""
        return self.objects.get(split) or self.objects["train"]


@dataclass(frozen=True)
class SceneObject:
    """One shape; `box` is (x1, y1, x2, y2) in pixels, covering x1 <= x < x2, y1 <= y < y2."""

    shape: str
    color: str
    box: tuple[int, int, int, int]

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def side(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def center_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True)
class Scene:
    image_size: int
    objects: tuple[SceneObject, ...]


# -- scenes ---------------------------------------------------------------------------------


def generate_scene(
    rng: random.Random,
    num_objects: int,
    *,
    image_size: int = 112,
    object_size: tuple[int, int] = (16, 34),
) -> Scene:
    """`num_objects` square-bounded shapes with distinct labels, at least GAP px apart.

    Distinct labels (colour + shape) make "the red circle" name exactly one object.
    """
    labels = [(shape, color) for color in COLORS for shape in SHAPES]
    for _ in range(MAX_TRIES):
        objects: list[SceneObject] = []
        for shape, color in rng.sample(labels, num_objects):
            box = _place(rng, rng.randint(*object_size), image_size, objects)
            if box is None:
                break
            objects.append(SceneObject(shape, color, box))
        else:
            return Scene(image_size, tuple(objects))
    raise ValueError(
        f"cannot place {num_objects} objects of {object_size[0]}-{object_size[1]} px on "
        f"{image_size} px; lower 'objects' or 'object_size'"
    )


def _place(
    rng: random.Random, side: int, image_size: int, others: list[SceneObject]
) -> tuple[int, int, int, int] | None:
    for _ in range(50):
        x, y = rng.randint(0, image_size - side), rng.randint(0, image_size - side)
        box = (x, y, x + side, y + side)
        if all(_apart(box, other.box) for other in others):
            return box
    return None


def _apart(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return (
        a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]
    )


def render_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB image; shapes are flat colours without anti-aliasing."""
    image = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        else:
            apex = (x1 + (x2 - 1 - x1) // 2, y1)
            draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), apex], fill=fill)
    return image


# -- questions ------------------------------------------------------------------------------

QA = tuple[str, str]


def ask(rng: random.Random, scene: Scene, question_type: str) -> QA | None:
    """(question, answer) of the given type, or None where the scene gives no unambiguous answer."""
    return _ASK[question_type](rng, scene.objects)


def _count(rng: random.Random, objects: tuple[SceneObject, ...]) -> QA:
    return "How many shapes are there?", str(len(objects))


def _count_color(rng: random.Random, objects: tuple[SceneObject, ...]) -> QA:
    # Mostly a colour that is present: "0" would otherwise be a strong constant baseline.
    colors = [obj.color for obj in objects]
    color = rng.choice(colors) if rng.random() < 0.75 else rng.choice(list(COLORS))
    return f"How many {color} shapes are there?", str(colors.count(color))


def _count_shape(rng: random.Random, objects: tuple[SceneObject, ...]) -> QA:
    shapes = [obj.shape for obj in objects]
    shape = rng.choice(shapes) if rng.random() < 0.75 else rng.choice(SHAPES)
    return f"How many {PLURAL[shape]} are there?", str(shapes.count(shape))


def _color_of_shape(rng: random.Random, objects: tuple[SceneObject, ...]) -> QA | None:
    obj = _pick_unique(rng, objects, lambda o: o.shape)
    if obj is None:
        return None
    return f"What color is the {obj.shape}?", obj.color


def _shape_of_color(rng: random.Random, objects: tuple[SceneObject, ...]) -> QA | None:
    obj = _pick_unique(rng, objects, lambda o: o.color)
    if obj is None:
        return None
    return f"What shape is the {obj.color} one?", obj.shape


def _pick_unique(
    rng: random.Random, objects: tuple[SceneObject, ...], attribute: Callable[[SceneObject], str]
) -> SceneObject | None:
    """A random object whose attribute no other object shares, so the attribute names it."""
    values = [attribute(obj) for obj in objects]
    unique = [obj for obj, value in zip(objects, values) if values.count(value) == 1]
    return rng.choice(unique) if unique else None


def _leftmost(rng: random.Random, objects: tuple[SceneObject, ...]) -> QA | None:
    return _extreme(objects, lambda o: (o.center_x, o.box[0]), "leftmost")


def _rightmost(rng: random.Random, objects: tuple[SceneObject, ...]) -> QA | None:
    return _extreme(objects, lambda o: (-o.center_x, -o.box[2]), "rightmost")


def _extreme(
    objects: tuple[SceneObject, ...],
    position: Callable[[SceneObject], tuple[float, int]],
    word: str,
) -> QA | None:
    """Asked only if one object wins by MARGIN px on its centre and also has the outermost edge."""
    if len(objects) < 2:
        return None
    first, *rest = sorted(objects, key=position)
    center, edge = position(first)
    if any(position(o)[0] - center < MARGIN or position(o)[1] <= edge for o in rest):
        return None
    return f"What is the {word} shape?", first.label


def _largest(rng: random.Random, objects: tuple[SceneObject, ...]) -> QA | None:
    if len(objects) < 2:
        return None
    first, second = sorted(objects, key=lambda o: -o.side)[:2]
    if first.side < LARGEST_RATIO * second.side:
        return None
    return "What is the largest shape?", first.label


def _left_of(rng: random.Random, objects: tuple[SceneObject, ...]) -> QA | None:
    """Yes/no about two objects whose horizontal extents are apart; yes and no equally often."""
    pairs = [(a, b) for a in objects for b in objects if a.box[2] + MARGIN <= b.box[0]]
    if not pairs:
        return None
    left, right = rng.choice(pairs)
    if rng.random() < 0.5:
        return f"Is the {left.label} left of the {right.label}?", "yes"
    return f"Is the {right.label} left of the {left.label}?", "no"


_ASK = {
    "count": _count,
    "count_color": _count_color,
    "count_shape": _count_shape,
    "color_of_shape": _color_of_shape,
    "shape_of_color": _shape_of_color,
    "leftmost": _leftmost,
    "rightmost": _rightmost,
    "largest": _largest,
    "left_of": _left_of,
}

# -- privileged text ------------------------------------------------------------------------


def family_box(box: tuple[int, int, int, int], image_size: int, family: str) -> tuple[int, ...]:
    """`box` in the coordinates `family` was trained on: absolute pixels (x1, y1, x2, y2) or
    integers relative to the image size on a 0..1000 scale (`families.FamilyInfo.box_coordinates`)."""
    if family_info(family).box_coordinates == "absolute":
        return box
    return tuple(round(v * 1000 / image_size) for v in box)


def format_boxes(scene: Scene, family: str) -> str:
    """One line per object, e.g. `red circle [12,30,40,58]`; no spaces, as they cost tokens."""
    return "\n".join(
        f"{obj.label} [{','.join(map(str, family_box(obj.box, scene.image_size, family)))}]"
        for obj in scene.objects
    )


_SIZE_WORDS = ("small", "medium", "large")


def format_caption(scene: Scene, object_size: tuple[int, int]) -> str:
    """A sentence listing the objects left to right with a size word (small / medium / large)."""
    low, high = object_size
    words = [
        f"a {_SIZE_WORDS[min(2, 3 * (obj.side - low) // (high - low + 1))]} {obj.label}"
        for obj in sorted(scene.objects, key=lambda o: (o.center_x, o.box[1]))
    ]
    listing = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return f"Left to right: {listing}."


def describe_partially(rng: random.Random, scene: Scene) -> str:
    """Fewer than all objects, each with only its colour or only its shape ("" for none).

    The text-only variant's question carries this, so neither the count nor any colour-shape
    pairing can be read off it: only the privileged text answers the question.
    """
    shown = rng.sample(scene.objects, rng.randint(0, len(scene.objects) - 1))
    if not shown:
        return ""
    parts = [f"a {obj.color} shape" if rng.random() < 0.5 else f"a {obj.shape}" for obj in shown]
    return f"Partly seen: {', '.join(parts)}."


# -- samples --------------------------------------------------------------------------------

FEATURES = sample_features(
    {
        "question_type": datasets.Value("string"),
        "image_size": datasets.Value("int32"),
        "objects": datasets.List(
            {
                "shape": datasets.Value("string"),
                "color": datasets.Value("string"),
                "box": datasets.List(datasets.Value("int32")),
            }
        ),
    }
)


def make_row(recipe: SyntheticScenesRecipe, split: str, index: int, family: str) -> dict:
    """Sample `index` of `split` as a `FEATURES` row, its boxes in `family`'s coordinates (a pure
    function of its arguments)."""
    rng = random.Random(f"synthetic_scenes:{recipe.seed}:{split}:{index}")
    question_type = rng.choice(recipe.question_types)
    scene, (question, answer) = _scene_for(rng, recipe, split, question_type)
    if recipe.privileged == "boxes":
        privileged = format_boxes(scene, family)
    else:
        privileged = format_caption(scene, recipe.object_size)
    if recipe.modality == "text":
        question = " ".join(filter(None, [describe_partially(rng, scene), question]))
        images = []
    else:
        images = [{"bytes": png_bytes(render_scene(scene)), "path": None}]
    objects = [{"shape": o.shape, "color": o.color, "box": list(o.box)} for o in scene.objects]
    meta = {"question_type": question_type, "image_size": scene.image_size, "objects": objects}
    return {
        "id": f"{split}-{index:05d}",
        "question": question,
        "answer": answer,
        "privileged": privileged,
        "images": images,
        "meta": meta,
        "reference": "",
    }


def _scene_for(
    rng: random.Random, recipe: SyntheticScenesRecipe, split: str, question_type: str
) -> tuple[Scene, QA]:
    """Draw scenes until one answers `question_type` unambiguously and belongs to `split`."""
    low, high = recipe.object_range(split)
    for _ in range(MAX_TRIES):
        try:
            scene = generate_scene(
                rng,
                rng.randint(low, high),
                image_size=recipe.image_size,
                object_size=recipe.object_size,
            )
        except ValueError as error:
            raise RecipeError(f"recipe {recipe.source}: {error}") from None
        qa = ask(rng, scene, question_type)
        if qa is not None and _belongs_to(split, scene, qa[0]):
            return scene, qa
    raise RecipeError(
        f"recipe {recipe.source}: question type '{question_type}' found no unambiguous scene "
        f"with {low}-{high} objects of {recipe.object_size[0]}-{recipe.object_size[1]} px"
    )


def _belongs_to(split: str, scene: Scene, question: str) -> bool:
    """Hash-partition scene+question between train and test, so the two are disjoint by
    construction (ood differs by its object counts instead)."""
    if split == "ood":
        return True
    digest = hashlib.sha1(repr((scene.objects, question)).encode()).digest()
    return (digest[0] % TEST_BUCKETS == 0) == (split == "test")
