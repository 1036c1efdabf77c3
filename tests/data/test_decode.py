"""The one decoder: big JPEGs are reduced while decoding, everything else decodes at full size."""

import io

import numpy as np
import pytest
from PIL import Image

import insect_exp  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)


def _jpeg(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth colour fields with fine noise, as a photo compresses.
    coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    pixels = pixels + rng.integers(-20, 20, pixels.shape, dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def _resized(image, size):
    import tensorflow as tf

    resized = tf.image.resize(image, size)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8).numpy()


@pytest.mark.parametrize(
    ("width", "height", "size", "ratio"),
    [
        (53, 37, (32, 32), 1),  # smaller than the target: decoded whole, resized up
        (400, 357, (180, 180), 1),  # 357 / 2 rounds up to 179 < 180
        (400, 359, (180, 180), 2),  # 359 / 2 rounds up to 180, as libjpeg rounds
        (500, 375, (180, 180), 2),
        (2000, 1500, (180, 180), 8),  # 1500 / 8 rounds up to 188
        (2000, 1500, (224, 224), 4),  # 1500 / 8 is 188 < 224
        (1440, 720, (180, 180), 4),  # the shorter side decides
    ],
)
def test_a_jpeg_is_reduced_by_the_largest_scale_that_still_covers_the_target(
    width, height, size, ratio
):
    import tensorflow as tf

    from insect_exp.data.decode import decode_image

    # Given a JPEG of some size
    contents = tf.constant(_jpeg(width, height))

    # When it is decoded for a target size
    ours = decode_image(contents, size).numpy()

    # Then it is libjpeg's reduction by the expected scale, resized: at full size it is exactly
    # what decoding every pixel and resizing gives
    reduced = tf.io.decode_jpeg(contents, channels=3, ratio=ratio)
    assert ours.shape == (*size, 3)
    np.testing.assert_array_equal(ours, _resized(reduced, size))
    if ratio == 1:
        whole = tf.io.decode_image(contents, channels=3, expand_animations=False)
        np.testing.assert_array_equal(ours, _resized(whole, size))


def test_a_reduced_jpeg_is_nearer_an_area_average_than_a_bilinear_resize_of_every_pixel():
    import tensorflow as tf

    from insect_exp.data.decode import decode_image

    # Given a photo-size JPEG, and its area-averaged downscale (what a thumbnail should be)
    contents = tf.constant(_jpeg(2000, 1500, seed=3))
    whole = tf.io.decode_jpeg(contents, channels=3)
    area = tf.image.resize(whole, (180, 180), method="area").numpy()

    # When it is decoded reduced, and decoded whole then resized bilinearly (Keras's loaders)
    ours = decode_image(contents, (180, 180)).numpy().astype(np.float32)
    bilinear = _resized(whole, (180, 180)).astype(np.float32)

    # Then the reduced one aliases less: it is nearer the area average
    assert np.abs(ours - area).mean() < np.abs(bilinear - area).mean()


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_an_image_already_the_target_size_keeps_its_exact_pixels(mode):
    import tensorflow as tf

    from insect_exp.data.decode import decode_image

    # Given a PNG of exactly the target size (its resize is skipped)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (96, 80, 3), dtype=np.uint8)).convert(mode)
    out = io.BytesIO()
    image.save(out, "PNG")
    contents = tf.constant(out.getvalue())

    # When it is decoded
    ours = decode_image(contents, (96, 80)).numpy()

    # Then it is its own pixels as RGB, which is also what the resize would have given
    whole = tf.io.decode_image(contents, channels=3, expand_animations=False)
    np.testing.assert_array_equal(ours, whole.numpy())
    np.testing.assert_array_equal(ours, _resized(whole, (96, 80)))


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize(
    ("fmt", "mode", "options"),
    [
        ("PNG", "RGB", {}), ("PNG", "1", {}), ("JPEG", "RGB", {}), ("GIF", "P", {}),
        ("BMP", "RGB", {}), ("WEBP", "RGB", {}), ("WEBP", "RGB", {"lossless": True}),
    ],
)  # fmt: skip
@pytest.mark.parametrize("size", [(53, 37), (300, 7)])
def test_an_image_over_the_pixel_limit_is_refused_with_its_size_and_one_at_it_decodes(
    fmt, mode, options, size
):
    import tensorflow as tf

    from insect_exp.data.decode import decode_image, refusal

    # Given a file of each format TensorFlow reads, width x height pixels
    data = tf.constant(_encoded(Image.new(mode, size), fmt, **options))
    pixels = size[0] * size[1]

    # Then at a limit of exactly its pixels it decodes, and one pixel fewer refuses it by its size
    assert decode_image(data, (8, 8), max_pixels=pixels).shape == (8, 8, 3)
    decode = tf.function(lambda c: decode_image(c, (8, 8), max_pixels=pixels - 1))
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        decode(data)
    assert refusal(err.value) == f"too many pixels ({size[0]}x{size[1]})"
