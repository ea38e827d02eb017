using System.Numerics.Tensors;
using EpA2A.Experts;
using EpA2A.Numerics;

namespace EpA2A.Tests;

/// <summary>
/// The vectorized row conversions of the CPU data plane (<see cref="TokenRows"/>) and the block copy out of a tensor
/// (<see cref="DenseTensor"/>) give bit for bit what the element-wise <see cref="TokenConvert"/> and
/// <see cref="Tensor{T}.FlattenTo"/> give, on random bit patterns (NaNs, infinities, subnormals, ties included) and
/// on lengths that leave a scalar tail after the vectors.
/// </summary>
public sealed class TokenRowsTests
{
    private static readonly int[] Lengths = [0, 1, 7, 15, 16, 17, 31, 33, 1024, 1037];

    [Fact]
    public void Bfloat16_rows_narrow_and_widen_exactly_as_element_by_element()
    {
        int seed = Random.Shared.Next();
        Random rng = new(seed);
        foreach (int n in Lengths)
        {
            float[] source = RandomFloats(rng, n);
            BFloat16[] got = Poisoned<BFloat16>(n);
            TokenRows.Narrow<BFloat16>(source, got);
            for (int i = 0; i < n; i++)
            {
                BFloat16 want = BFloat16.FromSingle(source[i]);
                Assert.True(got[i].RawBits == want.RawBits, $"seed {seed}, length {n}, element {i}: 0x{BitConverter.SingleToUInt32Bits(source[i]):X8} narrowed to 0x{got[i].RawBits:X4}, expected 0x{want.RawBits:X4}");
            }

            float[] wide = Poisoned<float>(n);
            TokenRows.Widen<BFloat16>(got, wide);
            for (int i = 0; i < n; i++)
            {
                Assert.True(BitConverter.SingleToUInt32Bits(wide[i]) == BitConverter.SingleToUInt32Bits(got[i].ToSingle()), $"seed {seed}, length {n}, element {i}: widened wrong");
            }
        }
    }

    [Fact]
    public void Half_rows_narrow_and_widen_exactly_as_element_by_element()
    {
        int seed = Random.Shared.Next();
        Random rng = new(seed);
        foreach (int n in Lengths)
        {
            float[] source = RandomFloats(rng, n);
            Half[] got = Poisoned<Half>(n);
            TokenRows.Narrow<Half>(source, got);
            float[] wide = Poisoned<float>(n);
            TokenRows.Widen<Half>(got, wide);
            for (int i = 0; i < n; i++)
            {
                Half want = (Half)source[i];
                Assert.True(got[i].Equals(want) || (Half.IsNaN(got[i]) && Half.IsNaN(want)), $"seed {seed}, length {n}, element {i}: {source[i]:R} narrowed to {got[i]}, expected {want}");
                Assert.True(wide[i].Equals((float)got[i]), $"seed {seed}, length {n}, element {i}: widened wrong");
            }
        }
    }

    [Theory]
    [InlineData(1f)]
    [InlineData(0.3f)]
    [InlineData(-2.5f)]
    public void A_scaled_row_sum_is_the_element_wise_one_bit_for_bit(float scale)
    {
        int seed = Random.Shared.Next();
        Random rng = new(seed);
        foreach (int n in Lengths.Append(1500))
        {
            BFloat16[] row = [.. RandomFloats(rng, n).Select(BFloat16.FromSingle)];
            float[] start = [.. Enumerable.Range(0, n).Select(_ => (float)(rng.NextDouble() - 0.5))];
            float[] want = (float[])start.Clone();
            float[] got = (float[])start.Clone();
            TokenConvert.Accumulate<BFloat16>(row, want, scale);
            TokenRows.Accumulate<BFloat16>(row, got, scale);
            for (int i = 0; i < n; i++)
            {
                Assert.True(BitConverter.SingleToUInt32Bits(got[i]) == BitConverter.SingleToUInt32Bits(want[i]), $"seed {seed}, length {n}, element {i}: {got[i]:R}, expected {want[i]:R}");
            }
        }
    }

    [Fact]
    public void The_built_in_experts_apply_to_every_row_of_their_block_as_the_scalar_definition_says()
    {
        int seed = Random.Shared.Next();
        Random rng = new(seed);
        const int hidden = 37;
        int[] starts = [0, 3, 40];
        int[] counts = [2, 37, 1];
        BFloat16[] rows = [.. RandomFloats(rng, 41 * hidden).Select(BFloat16.FromSingle)];
        BFloat16[] got = DeterministicExperts.ApplyToBlocks<BFloat16>(rows, hidden, 5, starts, counts);
        for (int j = 0; j < starts.Length; j++)
        {
            for (int i = starts[j] * hidden; i < (starts[j] + counts[j]) * hidden; i++)
            {
                BFloat16 want = BFloat16.FromSingle(DeterministicExperts.Apply(5 + j, rows[i].ToSingle()));
                Assert.True(got[i].RawBits == want.RawBits, $"seed {seed}: expert {5 + j}, element {i}: 0x{got[i].RawBits:X4}, expected 0x{want.RawBits:X4}");
            }
        }

        Assert.All(got.AsSpan(2 * hidden, hidden).ToArray(), v => Assert.Equal(0, v.RawBits)); // row 2 is no block's: left zero
    }

    [Fact]
    public void A_tensor_copies_out_row_major_whether_it_is_a_plain_array_or_a_strided_view()
    {
        int seed = Random.Shared.Next();
        Random rng = new(seed);
        BFloat16[] data = [.. RandomFloats(rng, 6 * 5).Select(BFloat16.FromSingle)];
        Tensor<BFloat16> plain = Tensor.Create(data, [6, 5]);
        Tensor<BFloat16> transposed = Tensor.Create(data, 0, [5, 6], [1, 5]);
        Tensor<BFloat16> oneRow = Tensor.Create(data, 0, [1, 5], ReadOnlySpan<nint>.Empty);
        foreach (Tensor<BFloat16> t in new[] { plain, transposed, oneRow })
        {
            BFloat16[] want = new BFloat16[t.FlattenedLength];
            t.FlattenTo(want);
            BFloat16[] got = DenseTensor.ToArray(t);
            Assert.True(want.SequenceEqual(got), $"seed {seed}: shape [{string.Join(", ", t.Lengths.ToArray())}] strides [{string.Join(", ", t.Strides.ToArray())}] copied out of order");
        }

        Assert.Throws<ArgumentException>(() => DenseTensor.CopyTo(plain, new BFloat16[29]));
        Assert.Empty(DenseTensor.ToArray(Tensor.Create(Array.Empty<BFloat16>(), [0, 5])));
    }

    /// <summary>Floats from random bits (so NaNs, infinities and subnormals occur), half of them near ties of bf16.</summary>
    private static float[] RandomFloats(Random rng, int n) =>
        [.. Enumerable.Range(0, n).Select(i =>
        {
            uint bits = (uint)rng.NextInt64(0, 1L << 32);
            return BitConverter.UInt32BitsToSingle(i % 2 == 0 ? bits : (bits & 0xFFFF_0000u) | 0x8000u | (uint)rng.Next(0, 2));
        })];

    private static T[] Poisoned<T>(int n)
        where T : unmanaged
    {
        T[] a = new T[n];
        System.Runtime.InteropServices.MemoryMarshal.AsBytes(a.AsSpan()).Fill(0xA5);
        return a;
    }
}
