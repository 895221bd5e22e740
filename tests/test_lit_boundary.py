"""The decision-boundary image: class regions coloured by prediction, points drawn on top."""

import torch

from manualbp.lit.boundary import class_colours, plane_grid, render_boundary


def _half_plane_probs(grid: torch.Tensor) -> torch.Tensor:
    """A sure classifier: class 1 right of x1 = 0, class 0 left of it."""
    right = (grid[:, 0] > 0).float()
    return torch.stack([1 - right, right], dim=1)


def test_regions_take_the_colour_of_the_predicted_class():
    x = torch.tensor([[-1.0, -1.0], [1.0, 1.0]])
    size = 40
    grid, lo, span = plane_grid(x, size)
    image = render_boundary(_half_plane_probs(grid), x[:0], torch.zeros(0), lo, span, size)
    assert image.shape == (size, size, 3) and image.dtype == torch.uint8
    colours = (class_colours(2) * 255).round()
    left, right = image[size // 2, 2].float(), image[size // 2, size - 3].float()
    # Fully sure: 85% class colour over white, so the class colour's hue shows through.
    expected = 0.15 * 255 + 0.85 * colours
    torch.testing.assert_close(left, expected[0], atol=1.0, rtol=0)
    torch.testing.assert_close(right, expected[1], atol=1.0, rtol=0)


def test_the_second_coordinate_grows_upwards():
    x = torch.tensor([[-1.0, -1.0], [1.0, 1.0]])
    size = 20
    grid, lo, span = plane_grid(x, size)
    upper = (grid[:, 1] > 0).float()  # class 1 above x2 = 0
    image = render_boundary(torch.stack([1 - upper, upper], 1), x[:0], torch.zeros(0), lo, span,
                            size)
    colours = (0.15 * 255 + 0.85 * (class_colours(2) * 255).round())
    torch.testing.assert_close(image[0, size // 2].float(), colours[1], atol=1.0, rtol=0)
    torch.testing.assert_close(image[-1, size // 2].float(), colours[0], atol=1.0, rtol=0)


def test_hesitant_regions_are_paler_than_sure_ones():
    x = torch.tensor([[-1.0, -1.0], [1.0, 1.0]])
    grid, lo, span = plane_grid(x, 8)
    sure = render_boundary(_half_plane_probs(grid), x[:0], torch.zeros(0), lo, span, 8)
    unsure = render_boundary(torch.full((64, 2), 0.5), x[:0], torch.zeros(0), lo, span, 8)
    assert unsure.float().mean() > sure.float().mean()  # closer to white


def test_points_are_discs_of_their_class_colour_with_a_dark_rim():
    x = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.5]])
    y = torch.tensor([0, 1, 1])
    size = 64
    grid, lo, span = plane_grid(x, size)
    image = render_boundary(torch.full((size * size, 2), 0.5), x, y, lo, span, size, radius=3)
    col = int((0.0 - lo[0]) / span[0] * size)
    row = int((1 - (0.5 - lo[1]) / span[1]) * size)
    colour = (class_colours(2)[1] * 255).round().to(torch.uint8)
    assert torch.equal(image[row, col], colour)  # centre: class 1
    assert int(image[row, col + 3].max()) < 40  # rim: dark
    # The second coordinate grows upwards: the point at x2=1 is in the top rows.
    top = image[: size // 4].reshape(-1, 3)
    assert bool((top == colour).all(-1).any())
