
namespace EpA2A.Safetensors.Tests;

/// <summary>Every rule of the safetensors format, broken on purpose in hand-made bytes, gives its own clear error.</summary>
public sealed class SafetensorsValidationTests
{
    private const string Source = "broken.safetensors";

    /// <summary>A valid two-tensor header: "a" F32 [2] at [0, 8), "b" I32 [1] at [8, 12).</summary>
    private const string GoodHeader =
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[8,12]}}";

    public static TheoryData<string, string[]> Cases() => new()
    {
        { "shorter than the length prefix", ["too short", "8-byte header length"] },
        { "absurd header length", ["more than the 100000000", "header"] },
        { "header length past the end", ["header length is 4096 bytes", "truncated"] },
        { "header not an object", ["must be a JSON object starting with '{'"] },
        { "malformed json", ["not valid JSON"] },
        { "unknown dtype", ["tensor 'a'", "dtype \"F12\"", "does not know"] },
        { "shape disagrees with offsets", ["tensor 'a'", "shape [3] of F32 needs 12 bytes", "span 8"] },
        { "negative dimension", ["tensor 'a'", "dimension 0 is negative"] },
        { "offsets past the buffer", ["tensor 'b'", "past the end of the 10-byte data buffer"] },
        { "offsets reversed", ["tensor 'a'", "data_offsets [8, 0]", "0 <= begin <= end"] },
        { "overlapping tensors", ["tensor 'b' [4, 8) overlaps tensor 'a' [0, 8)"] },
        { "gap between tensors", ["bytes [8, 12) of the data buffer belong to no tensor", "before tensor 'b'"] },
        { "trailing bytes", ["bytes [12, 16) at the end of the data buffer belong to no tensor"] },
        { "duplicate names", ["names 'a' twice"] },
        { "missing shape", ["tensor 'a' has no \"shape\""] },
        { "fractional dimension", ["tensor 'a'", "shape[0] = 2.5 is not an integer"] },
        { "metadata not strings", ["metadata 'n' is a JSON number", "must be strings"] },
        { "tensor entry not an object", ["tensor 'a' is a JSON array"] },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void A_broken_file_is_an_InvalidDataException_naming_the_file_and_the_rule(string brokenRule, string[] messageParts)
    {
        byte[] bytes = Broken(brokenRule);

        InvalidDataException e = Assert.Throws<InvalidDataException>(() => SafetensorsReader.Parse(bytes, Source));

        Assert.StartsWith(Source + ":", e.Message, StringComparison.Ordinal);
        foreach (string part in messageParts)
        {
            Assert.Contains(part, e.Message, StringComparison.Ordinal);
        }
    }

    [Fact]
    public void The_good_header_of_these_cases_is_itself_accepted()
    {
        SafetensorsFile file = SafetensorsReader.Parse(SafetensorsBytes.Craft(GoodHeader, SafetensorsBytes.Buffer(12)), Source);
        Assert.Equal(["a", "b"], file.Tensors.Select(t => t.Name));
    }

    [Fact]
    public void A_broken_file_on_disk_is_named_by_its_path_and_rejected_before_its_buffer_is_read()
    {
        string path = Path.Combine(Path.GetTempPath(), $"epa2a-broken-{Guid.NewGuid():N}.safetensors");
        try
        {
            File.WriteAllBytes(path, Broken("header length past the end"));
            InvalidDataException e = Assert.Throws<InvalidDataException>(() => SafetensorsReader.Read(path));
            Assert.StartsWith(path + ":", e.Message, StringComparison.Ordinal);
            Assert.Contains("truncated", e.Message, StringComparison.Ordinal);
        }
        finally
        {
            File.Delete(path);
        }
    }

    private static byte[] Broken(string rule)
    {
        byte[] buffer = SafetensorsBytes.Buffer(12);
        return rule switch
        {
            "shorter than the length prefix" => [1, 2, 3],
            "absurd header length" => SafetensorsBytes.Craft(GoodHeader, buffer, declaredHeaderLength: 1UL << 40),
            "header length past the end" => SafetensorsBytes.Craft(GoodHeader, buffer, declaredHeaderLength: 4096),
            "header not an object" => SafetensorsBytes.Craft("[1, 2]", buffer),
            "malformed json" => SafetensorsBytes.Craft("{\"a\":{\"dtype\":\"F32\",", buffer),
            "unknown dtype" => SafetensorsBytes.Craft(GoodHeader.Replace("F32", "F12", StringComparison.Ordinal), buffer),
            "shape disagrees with offsets" => SafetensorsBytes.Craft(GoodHeader.Replace("[2]", "[3]", StringComparison.Ordinal), buffer),
            "negative dimension" => SafetensorsBytes.Craft(GoodHeader.Replace("[2]", "[-2]", StringComparison.Ordinal), buffer),
            "offsets past the buffer" => SafetensorsBytes.Craft(GoodHeader, SafetensorsBytes.Buffer(10)),
            "offsets reversed" => SafetensorsBytes.Craft(GoodHeader.Replace("[0,8]", "[8,0]", StringComparison.Ordinal), buffer),
            "overlapping tensors" => SafetensorsBytes.Craft(GoodHeader.Replace("[8,12]", "[4,8]", StringComparison.Ordinal), buffer),
            "gap between tensors" => SafetensorsBytes.Craft(GoodHeader.Replace("[8,12]", "[12,16]", StringComparison.Ordinal), SafetensorsBytes.Buffer(16)),
            "trailing bytes" => SafetensorsBytes.Craft(GoodHeader, SafetensorsBytes.Buffer(16)),
            "duplicate names" => SafetensorsBytes.Craft(GoodHeader.Replace("\"b\"", "\"a\"", StringComparison.Ordinal), buffer),
            "missing shape" => SafetensorsBytes.Craft(GoodHeader.Replace("\"shape\":[2],", string.Empty, StringComparison.Ordinal), buffer),
            "fractional dimension" => SafetensorsBytes.Craft(GoodHeader.Replace("[2]", "[2.5]", StringComparison.Ordinal), buffer),
            "metadata not strings" => SafetensorsBytes.Craft(GoodHeader.Replace("{\"a\"", "{\"__metadata__\":{\"n\":3},\"a\"", StringComparison.Ordinal), buffer),
            "tensor entry not an object" => SafetensorsBytes.Craft("{\"a\":[1,2,3]}", []),
            _ => throw new ArgumentOutOfRangeException(nameof(rule), rule, "no such case"),
        };
    }
}
