using System.Numerics.Tensors;
using EpA2A.Numerics;

namespace EpA2A.Tests;

/// <summary>The fast paths of big steps (tabulated element functions, dense tensor copies) give the same bits as the slow ones.</summary>
public sealed class TokenTableTests
{
    [Fact]
    public void A_bf16_table_equals_the_function_on_every_input() => EveryInput<BFloat16>();

    [Fact]
    public void A_fp16_table_equals_the_function_on_every_input() => EveryInput<Half>();

    [Fact]
    public void There_is_no_table_for_fp32() =>
        Assert.Throws<NotSupportedException>(() => new TokenTable<float>(x => x));

    [Fact]
    public void A_dense_tensor_copies_as_FlattenTo_does_and_a_strided_one_still_works()
    {
        int seed = Random.Shared.Next();
        Random rng = new(seed);
        float[] data = [.. Enumerable.Range(0, 6 * 7).Select(_ => rng.NextSingle() + 0.5f)];
        Tensor<float> dense = Tensor.Create(data, [6, 7]);
        float[] want = new float[data.Length];
        dense.FlattenTo(want);
        Assert.Equal(want, TensorCopy.ToArray(dense));

        // A view of columns 2..4 of every row is not dense: FlattenTo's element walk is the fallback.
        Tensor<float> strided = Tensor.Create(data, 2, [6, 3], [7, 1]);
        Assert.False(strided.IsDense);
        float[] cols = TensorCopy.ToArray(strided);
        for (int r = 0; r < 6; r++)
        {
            for (int c = 0; c < 3; c++)
            {
                Assert.True(cols[(r * 3) + c] == data[(r * 7) + 2 + c], $"row {r} column {c}, seed {seed}");
            }
        }

        Assert.Throws<ArgumentException>(() => TensorCopy.FlattenTo(dense, new float[data.Length - 1]));
    }

    private static void EveryInput<T>()
        where T : unmanaged
    {
        static float F(float x) => (x * 1.375f) - 0.1875f;
        TokenTable<T> table = new(F);
        for (int bits = 0; bits < 1 << 16; bits++)
        {
            ushort b = (ushort)bits;
            T x = System.Runtime.CompilerServices.Unsafe.As<ushort, T>(ref b);
            T direct = TokenConvert.FromSingle<T>(F(TokenConvert.ToSingle(x)));
            T tabled = table.Apply(x);
            bool same = EqualityComparer<T>.Default.Equals(direct, tabled) || (float.IsNaN(TokenConvert.ToSingle(direct)) && float.IsNaN(TokenConvert.ToSingle(tabled)));
            if (!same)
            {
                Assert.Fail($"input bits 0x{bits:x4}: table {tabled}, direct {direct}");
            }
        }
    }
}
